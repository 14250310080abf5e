"""Name -> evaluator class; ``build_evaluator`` validates a config against the class."""

from __future__ import annotations

import inspect
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.evaluation.base import Evaluator
from evomerge.evaluation.objective import TEST_PATH

EVALUATORS: dict[str, type[Evaluator]] = {}


def register(cls: type[Evaluator]) -> type[Evaluator]:
    """Class decorator adding an evaluator to the registry under ``cls.name``."""
    EVALUATORS[cls.name] = cls
    return cls


def _load_builtin() -> None:
    from evomerge.evaluation import accuracy, entropy, lmeval, perplexity, python  # noqa: F401


def build_evaluator(spec: dict[str, Any]) -> Evaluator:
    """Make an evaluator from ``{"type": name, **settings}``, with clear errors for bad settings.

    An optional ``name`` prefixes the evaluator's metrics (``name/metric``).
    """
    _load_builtin()
    spec = dict(spec)
    kind = spec.pop("type", None)
    prefix = spec.pop("name", None)
    spec.pop(TEST_PATH, None)  # read by Objective.for_split when a report switches to the test split
    if kind not in EVALUATORS:
        raise EvomergeError(f"unknown evaluator {kind!r}; known: {', '.join(sorted(EVALUATORS))}")
    cls = EVALUATORS[kind]
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(spec) - set(params) - {"self"})
    if unknown:
        valid = ", ".join(p for p in params if p != "self")
        raise EvomergeError(f"evaluator {kind}: unknown setting {unknown[0]!r}; valid: {valid}")
    missing = [p for p, v in params.items() if p != "self" and v.default is inspect.Parameter.empty and p not in spec]
    if missing:
        raise EvomergeError(f"evaluator {kind}: missing setting {missing[0]!r}")
    if prefix is not None and (not isinstance(prefix, str) or not prefix or "/" in prefix):
        raise EvomergeError(f"evaluator {kind}: name must be a non-empty string without '/', not {prefix!r}")
    evaluator = cls(**spec)
    evaluator.prefix = prefix
    return evaluator
