"""Ask/tell optimizers over genomes in the unit box, with exact resume.

Backends: ``cmaes`` (pycma, generational), ``tpe``, ``optuna_cmaes`` and ``nsga2``
(Optuna, asynchronous, journal storage) and ``random``. The search loop asks for
candidates, evaluates them however it likes, tells their scores (None for a
failure, which is then scored as the worst value so far), and calls ``save``
after every ask and tell; a new process continues identically after ``restore``.
Importing this package does not import pycma or Optuna.
"""

from evomerge.optimize.base import Ask, Optimizer
from evomerge.optimize.registry import OPTIMIZERS, build_optimizer

__all__ = ["OPTIMIZERS", "Ask", "Optimizer", "build_optimizer"]
