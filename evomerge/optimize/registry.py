"""Name -> optimizer class; ``build_optimizer`` checks a configuration against the class."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.optimize.base import Optimizer, check_problem
from evomerge.optimize.cmaes import CmaEs
from evomerge.optimize.optuna_samplers import Nsga2, OptunaCmaEs, Tpe
from evomerge.optimize.random_search import RandomSearch

OPTIMIZERS: dict[str, type[Optimizer]] = {cls.name: cls for cls in (CmaEs, Tpe, OptunaCmaEs, Nsga2, RandomSearch)}


def settings_of(cls: type[Optimizer]) -> list[str]:
    """The setting keys a backend accepts (its own keyword arguments)."""
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def build_optimizer(
    name: str,
    *,
    dim: int,
    names: Sequence[str],
    directions: Sequence[str],
    seed: int,
    state_dir: Path,
    settings: dict[str, Any] | None = None,
    x0: Sequence[float] | None = None,
) -> Optimizer:
    """Make the optimizer ``name``, with errors that list the valid names and settings.

    ``x0`` is where the search starts: CMA-ES's initial mean; the first candidate
    of the other backends. None: the centre of the box.
    """
    if name not in OPTIMIZERS:
        raise EvomergeError(f"unknown optimizer {name!r}; known: {', '.join(sorted(OPTIMIZERS))}")
    cls = OPTIMIZERS[name]
    settings = dict(settings or {})
    valid = settings_of(cls)
    unknown = sorted(set(settings) - set(valid))
    if unknown:
        raise EvomergeError(f"optimizer {name}: unknown setting {unknown[0]!r}; valid: {', '.join(valid) or 'none'}")
    check_problem(cls, dim, names, directions)
    return cls(dim=dim, names=list(names), directions=list(directions), seed=seed, state_dir=state_dir, x0=x0,
               **settings)
