"""Name -> merge method map; every method module registers itself here."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from evomerge.errors import EvomergeError

Kernel = Callable[..., Any]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: its kernel and the parameters it accepts, with mergekit's defaults.

    ``source_params`` are given per source model (e.g. ``weight``, ``density``);
    ``global_params`` once per merge (e.g. ``normalize``, ``lambda``).
    """

    name: str
    kernel: Kernel
    needs_base: bool
    source_params: dict[str, Any] = field(default_factory=dict)
    global_params: dict[str, Any] = field(default_factory=dict)


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add ``method`` to the registry under its name."""
    METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    """Look up a method by its mergekit name, with a clear error listing the known ones."""
    _load_builtin()
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise EvomergeError(f"unknown merge_method {name!r}; known methods: {known}") from None


def _load_builtin() -> None:
    from evomerge.methods import task_arithmetic, ties  # noqa: F401  (register on import)


def weighted_deltas(base, tensors: Sequence, weights: Sequence[float]):
    """Stack of task vectors ``w_i * (theta_i - theta_base)`` in float32."""
    import torch

    base32 = base.float()
    return torch.stack([(t.float() - base32) * w for t, w in zip(tensors, weights)])


def apply_method(
    name: str,
    base,
    tensors: Sequence,
    source_params: Sequence[dict[str, Any]] | None = None,
    global_params: dict[str, Any] | None = None,
):
    """Merge one tensor with method ``name``, filling mergekit's defaults.

    ``source_params[i]`` holds the per-source parameters of ``tensors[i]``
    (e.g. ``{"weight": 0.5, "density": 0.3}``); ``global_params`` the method-wide
    ones (``lambda``, ``normalize``). Unknown parameter names are an error.
    """
    method = get_method(name)
    source_params = source_params or [{} for _ in tensors]
    kwargs: dict[str, Any] = {}
    for key, default in method.source_params.items():
        kwargs[key] = [p.get(key, default) for p in source_params]
    for p in source_params:
        unknown = set(p) - set(method.source_params)
        if unknown:
            raise EvomergeError(f"{name}: unknown per-model parameter(s) {sorted(unknown)}")
    for key, value in (global_params or {}).items():
        if key not in method.global_params:
            raise EvomergeError(f"{name}: unknown parameter {key!r}")
        kwargs["lambda_" if key == "lambda" else key] = value
    return method.kernel(base, tensors, **kwargs)
