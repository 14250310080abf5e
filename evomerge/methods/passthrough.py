"""Passthrough: copy one tensor unchanged (optionally scaled) — the basis of frankenmerges."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.methods.registry import MergeMethod, register


def passthrough(base, tensors: Sequence[torch.Tensor], *, scale: Sequence[float | None]) -> torch.Tensor:
    """Return the single input tensor, multiplied by its ``scale`` when one is set."""
    (x,) = tensors
    s = scale[0]
    return x if s is None else (x.float() * s).to(x.dtype)


register(
    MergeMethod(
        name="passthrough",
        kernel=passthrough,
        base="none",
        source_params={"scale": None},
        max_sources=1,
    )
)
