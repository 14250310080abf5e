"""Name -> merge method map; every method module registers itself here."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from evomerge.errors import EvomergeError

Kernel = Callable[..., Any]
#: Default marking a parameter the recipe must set (mergekit's "required").
REQUIRED = object()


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: its kernel and the parameters it accepts, with mergekit's defaults.

    ``source_params`` are given per source model (e.g. ``weight``, ``density``);
    ``global_params`` once per tensor (e.g. ``normalize``, ``lambda``). A default
    of ``REQUIRED`` means the recipe must provide it. ``base`` says whether the
    method needs a base model (``"required"``), can use one, or merges all
    inputs alike (``"none"``). ``random`` methods take a ``generator``.
    """

    name: str
    kernel: Kernel
    base: str = "required"
    source_params: dict[str, Any] = field(default_factory=dict)
    global_params: dict[str, Any] = field(default_factory=dict)
    random: bool = False
    min_sources: int = 1
    max_sources: int | None = None

    def run(self, base, tensors: Sequence, kwargs: dict[str, Any], generator=None):
        """Call the kernel with complete, already validated keyword arguments."""
        if self.random:
            kwargs = {**kwargs, "generator": generator}
        return self.kernel(base, list(tensors), **kwargs)

    def kwargs(self, source_params: Sequence[dict[str, Any]], global_params: dict[str, Any]) -> dict[str, Any]:
        """Kernel keyword arguments from resolved per-source and global parameters."""
        out: dict[str, Any] = {key: [p[key] for p in source_params] for key in self.source_params}
        for key in self.global_params:
            out["lambda_" if key == "lambda" else key] = global_params[key]
        return out


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add ``method`` to the registry under its name."""
    METHODS[method.name] = method
    return method


def _load_builtin() -> None:
    from evomerge.methods import (  # noqa: F401  (modules register on import)
        generalized_task_arithmetic,
        linear,
        model_stock,
        passthrough,
        slerp,
    )


def get_method(name: str) -> MergeMethod:
    """Look up a method by its mergekit name, with a clear error listing the known ones."""
    _load_builtin()
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise EvomergeError(f"unknown merge_method {name!r}; known methods: {known}") from None


def all_methods() -> dict[str, MergeMethod]:
    """Every registered method by name."""
    _load_builtin()
    return dict(METHODS)


def check_params(method: MergeMethod, names: Sequence[str], where: str) -> None:
    """Raise a clear error naming the valid parameters when ``names`` has an unknown one."""
    valid = set(method.source_params) | set(method.global_params)
    unknown = sorted(set(names) - valid)
    if unknown:
        listing = ", ".join(sorted(valid)) or "(none)"
        raise EvomergeError(f"{where}: {method.name} has no parameter {unknown[0]!r}; valid: {listing}")


def apply_method(
    name: str,
    base,
    tensors: Sequence,
    source_params: Sequence[dict[str, Any]] | None = None,
    global_params: dict[str, Any] | None = None,
    generator=None,
):
    """Merge one tensor with method ``name``, filling mergekit's defaults.

    ``source_params[i]`` holds the per-source parameters of ``tensors[i]``
    (e.g. ``{"weight": 0.5, "density": 0.3}``); ``global_params`` the method-wide
    ones (``lambda``, ``normalize``). Unknown or missing required parameters are
    an error.
    """
    method = get_method(name)
    source_params = source_params or [{} for _ in tensors]
    global_params = global_params or {}
    for p in source_params:
        check_params(method, [k for k in p if k not in method.global_params], name)
    check_params(method, list(global_params), name)
    kwargs: dict[str, Any] = {}
    for key, default in method.source_params.items():
        values = [p.get(key, default) for p in source_params]
        if any(v is REQUIRED for v in values):
            raise EvomergeError(f"{name}: parameter {key!r} is required for every model")
        kwargs[key] = values
    for key, default in method.global_params.items():
        value = global_params.get(key, default)
        if value is REQUIRED:
            raise EvomergeError(f"{name}: parameter {key!r} is required")
        kwargs["lambda_" if key == "lambda" else key] = value
    return method.run(base, tensors, kwargs, generator)
