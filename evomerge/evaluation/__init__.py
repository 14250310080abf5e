"""Evaluators: plugins that score a live model and return named metrics.

Each evaluator is configured once, set up once per worker (``setup``: load data,
build lm-eval tasks, wrap the model) and then called once per candidate
(``evaluate``), so nothing that does not depend on the candidate is redone.
"""

from evomerge.evaluation.base import EvaluationError, Evaluator
from evomerge.evaluation.registry import EVALUATORS, build_evaluator

__all__ = ["EVALUATORS", "EvaluationError", "Evaluator", "build_evaluator"]
