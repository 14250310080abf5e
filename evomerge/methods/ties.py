"""TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint merge."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.methods.registry import MergeMethod, register


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ``density`` fraction of ``|delta|`` entries (mergekit's ``magnitude``)."""
    if density >= 1.0:
        return torch.ones_like(delta, dtype=torch.bool)
    k = int(density * delta.numel())
    if k <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    # Exactly k entries survive, as in mergekit, even when magnitudes tie.
    keep = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    keep[torch.topk(delta.abs().flatten(), k, sorted=False).indices] = True
    return keep.view_as(delta)


def ties(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    weight: Sequence[float],
    density: Sequence[float],
    normalize: bool = True,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """TIES merge with mergekit's semantics.

    Each task vector keeps its top-``density`` entries by magnitude and is scaled
    by its weight; the sign of each entry is elected by the sign of the sum; entries
    that agree with the elected sign are summed and, with ``normalize``, divided by
    the sum of the weights of the agreeing entries.
    """
    base32 = base.float()
    deltas = []
    for t, w, d in zip(tensors, weight, density):
        delta = t.float() - base32
        deltas.append(delta * magnitude_mask(delta, d) * w)
    stacked = torch.stack(deltas)
    sign = torch.sign(stacked.sum(0))
    agree = torch.sign(stacked) == sign
    mixed = (stacked * agree).sum(0)
    if normalize:
        w = torch.tensor(list(weight), dtype=torch.float32).view(-1, *([1] * base.dim()))
        divisor = (agree * w).sum(0)
        mixed = mixed / torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    return (base32 + lambda_ * mixed).to(base.dtype)


register(
    MergeMethod(
        name="ties",
        kernel=ties,
        needs_base=True,
        source_params={"weight": 1.0, "density": 1.0},
        global_params={"normalize": True, "lambda": 1.0},
    )
)
