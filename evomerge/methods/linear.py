"""Linear: weighted average of all input models (model soups)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.errors import EvomergeError
from evomerge.methods.registry import REQUIRED, MergeMethod, register


def linear(base, tensors: Sequence[torch.Tensor], *, weight: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """``sum_i w_i x_i``, divided by ``sum_i w_i`` when ``normalize``. ``base`` is unused."""
    out = tensors[0].float() * weight[0]
    for t, w in zip(tensors[1:], weight[1:]):
        out.add_(t.float() * w)
    if normalize:
        total = float(torch.tensor(list(weight), dtype=torch.float32).sum())
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
