"""Task arithmetic (Ilharco et al. 2023): base + lambda * sum_i w_i * tau_i."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.methods.registry import MergeMethod, register, weighted_deltas


def task_arithmetic(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    weight: Sequence[float],
    normalize: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """Merge by adding the weighted sum of task vectors to ``base``.

    With ``normalize`` the sum is divided by the sum of weights, as in mergekit.
    Computed in float32 and cast back to ``base.dtype``.
    """
    deltas = weighted_deltas(base, tensors, weight)
    mixed = deltas.sum(0)
    if normalize:
        total = float(sum(weight))
        if total != 0:
            mixed = mixed / total
    return (base.float() + lambda_ * mixed).to(base.dtype)


register(
    MergeMethod(
        name="task_arithmetic",
        kernel=task_arithmetic,
        needs_base=True,
        source_params={"weight": 1.0},
        global_params={"normalize": False, "lambda": 1.0},
    )
)
