"""Sparsifiers for task vectors: TIES magnitude, DARE random drop, breadcrumbs, DELLA.

Each takes a delta and returns a mask-applied (and optionally rescaled) delta.
Computation is float32. At ``density >= 1`` every sparsifier returns the delta
unchanged, as in mergekit.
"""

from __future__ import annotations

import torch

#: How a dropped-out delta is rescaled: mergekit restores the L1 norm; the DARE
#: paper divides by the keep probability.
RESCALE_METHODS = ("l1", "inverse_density")


def _rescaled(delta: torch.Tensor, mask: torch.Tensor, rescale: bool, how: str, density: float) -> torch.Tensor:
    masked = delta * mask
    if not rescale:
        return masked
    if how == "inverse_density":
        return masked / density
    before = delta.abs().sum()
    after = masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def topk_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of ``magnitude`` (exactly ``k``)."""
    flat = magnitude.reshape(-1)
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        keep[torch.topk(flat, k, sorted=False).indices] = True
    return keep.view_as(magnitude)


def magnitude(delta: torch.Tensor, density: float, *, rescale: bool = False, how: str = "l1") -> torch.Tensor:
    """TIES trim: keep the top ``int(density * numel)`` entries by magnitude.

    mergekit asserts when that count is 0; here the delta is then dropped whole.
    """
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    return _rescaled(delta, topk_mask(delta.abs(), k), rescale, how, density)


def random_drop(delta: torch.Tensor, density: float, *, rescale: bool = True, how: str = "l1",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``, then rescale."""
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=generator, device=delta.device, dtype=torch.float32) < density
    return _rescaled(delta, keep, rescale, how, density)


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float = 0.01, *,
                       rescale: bool = False, how: str = "l1") -> torch.Tensor:
    """Model Breadcrumbs: drop the top ``gamma`` outliers and the smallest entries.

    Keeps the ``int(density * numel)`` entries just below the ``int(gamma * numel)``
    largest. (mergekit zeroes the whole tensor when ``gamma * numel < 1`` through
    a slicing slip; here nothing is dropped from the top in that case.)
    """
    if density >= 1:
        return delta
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    order = torch.argsort(delta.abs().reshape(-1))
    keep = torch.zeros(n, dtype=torch.bool, device=delta.device)
    keep[order[n_bot : n - n_top]] = True
    return _rescaled(delta, keep.view_as(delta), rescale, how, density)


def della_magprune(delta: torch.Tensor, density: float, epsilon: float = 0.15, *, rescale: bool = True,
                   how: str = "l1", generator: torch.Generator | None = None) -> torch.Tensor:
    """DELLA: per-row keep probabilities from density-epsilon (smallest) to density+epsilon (largest)."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if density - epsilon <= 0 or density + epsilon >= 1:
        raise ValueError(f"della needs 0 < density - epsilon and density + epsilon < 1 (density {density}, epsilon {epsilon})")
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    n_cols = rows.shape[1]
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1), dim=1).to(torch.float32)
    spread = ranks / max(1, n_cols - 1)
    probs = (density - epsilon) + 2 * epsilon * spread
    keep = torch.rand(rows.shape, generator=generator, device=delta.device, dtype=torch.float32) < probs
    out = rows * keep
    if rescale:
        if how == "inverse_density":
            out = out / probs
        else:
            out = _rescaled(rows, keep, True, "l1", density)
    return out.view_as(delta)
