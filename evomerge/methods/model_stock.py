"""Model Stock (Jang et al. 2024): interpolate toward the average by the deltas' agreement."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import torch

from evomerge.methods.registry import MergeMethod, register


def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, filter_wise: bool = False) -> torch.Tensor:
    """``t * mean(models) + (1 - t) * base`` with ``t = N cos / (1 + (N - 1) cos)``.

    ``cos`` is the mean pairwise cosine between the models' deltas from the
    base, over the whole tensor or, with ``filter_wise``, per row (last dim).
    Needs at least two models besides the base.
    """
    if len(tensors) < 2:
        raise ValueError("model_stock needs at least two models besides the base")
    shape = base.shape
    w0 = base.float()
    ws = [t.float() for t in tensors]
    if filter_wise:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cos = []
    for a, b in combinations(offsets, 2):
        norms = (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-6)
        cos.append(((a * b).sum(dim=-1) / norms).clamp(-1, 1))
    c = torch.stack(cos).mean(0).unsqueeze(-1)
    n = len(ws)
    t = n * c / (1 + (n - 1) * c)
    avg = torch.stack(ws).sum(0) / n
    return (t * avg + (1 - t) * w0).reshape(shape).to(base.dtype)


register(
    MergeMethod(
        name="model_stock",
        kernel=model_stock,
        global_params={"filter_wise": False},
        min_sources=2,
    )
)
