"""A user's own metric: ``path/to/file.py:function`` or ``package.module:function``."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.evaluation.base import EvaluationError, Evaluator
from evomerge.evaluation.registry import register


def load_function(ref: str):
    """Import ``module:function`` or ``file.py:function``, with clear errors."""
    module_ref, sep, attr = ref.rpartition(":")
    if not sep or not module_ref or not attr:
        raise EvomergeError(f"python evaluator: function must be 'module:function' or 'file.py:function', not {ref!r}")
    try:
        if module_ref.endswith(".py"):
            path = Path(module_ref)
            if not path.exists():
                raise EvomergeError(f"python evaluator: {path} not found")
            # modules beside the file import as they would were it run as a script
            folder = str(path.resolve().parent)
            if folder not in sys.path:
                sys.path.insert(0, folder)
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_ref)
    except EvomergeError:
        raise
    except (Exception, SystemExit) as exc:  # a module calling sys.exit() must not end the search
        raise EvomergeError(f"python evaluator: cannot import {module_ref}: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise EvomergeError(f"python evaluator: {module_ref} has no function {attr!r}")
    return fn


@register
class PythonEvaluator(Evaluator):
    """Calls ``function(model, tokenizer, **kwargs)``, which returns ``{metric: number}``."""

    name = "python"

    def __init__(self, function: str, kwargs: dict | None = None) -> None:
        if kwargs is not None and not isinstance(kwargs, dict):
            raise EvomergeError(f"python evaluator: kwargs must be a mapping of argument names to values, "
                                f"not {kwargs!r}")
        self.function = load_function(function)
        self.ref = function
        self.kwargs = dict(kwargs or {})
        try:
            signature = inspect.signature(self.function)
        except (TypeError, ValueError):  # a callable without one (a builtin): found out at the first call
            return
        try:
            signature.bind(None, None, **self.kwargs)
        except TypeError as exc:  # a misspelt argument would otherwise fail every candidate of the search
            raise EvomergeError(f"python evaluator: {function} cannot be called as function(model, tokenizer"
                                + "".join(f", {k}=..." for k in self.kwargs) + f"): {exc}") from None

    def evaluate(self, model, tokenizer) -> dict[str, float]:
        try:
            return self.function(model, tokenizer, **self.kwargs)
        except SystemExit as exc:  # would end the whole search, not fail this candidate
            raise EvaluationError(f"python evaluator: {self.ref} called sys.exit({exc.code})") from None
