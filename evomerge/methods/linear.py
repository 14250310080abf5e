"""Linear: weighted average of all input models (model soups)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.errors import EvomergeError
from evomerge.methods.registry import REQUIRED, MergeMethod, register


def linear(base, tensors: Sequence[torch.Tensor], *, weight: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """``sum_i w_i x_i``, divided by ``sum_i w_i`` when ``normalize``. ``base`` is unused."""
    stacked = torch.stack([t.float() for t in tensors])
    w = torch.tensor(list(weight), dtype=torch.float32).view(-1, *([1] * tensors[0].dim()))
    out = (stacked * w).sum(0)
    if normalize:
        total = float(w.sum())
        if total == 0:
            raise EvomergeError("linear: weights sum to 0, cannot normalize (set normalize: false)")
        out = out / total
    return out.to(tensors[0].dtype)


register(
    MergeMethod(
        name="linear",
        kernel=linear,
        base="none",
        source_params={"weight": REQUIRED},
        global_params={"normalize": True},
    )
)
