"""The task-vector family: task_arithmetic, ties, dare_*, breadcrumbs*, della*.

All eight are one kernel with mergekit's semantics: task vectors
``delta_i = theta_i - theta_base`` are sparsified (TIES magnitude, DARE random
drop, breadcrumbs, DELLA), weighted, optionally reduced by sign consensus
(TIES: per entry, the sign of the weighted sum wins, an exact-zero sum counts as
positive, zero entries never agree), summed, optionally normalized by the summed
weights of the contributing entries, scaled by ``lambda`` and added to the base.
Computation is float32; the result has the base's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch

from evomerge.methods import sparsify
from evomerge.methods.registry import REQUIRED, MergeMethod, register


def generalized_task_arithmetic(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    weight: Sequence[float],
    density: Sequence[float] | None = None,
    gamma: Sequence[float] | None = None,
    epsilon: Sequence[float] | None = None,
    normalize: bool = False,
    rescale: bool = False,
    rescale_method: str = "l1",
    lambda_: float = 1.0,
    int8_mask: bool = False,
    sparsifier: str | None = None,
    consensus: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Merge ``tensors`` onto ``base`` through their task vectors (see module doc).

    ``rescale_method`` picks how DARE/DELLA restore the dropped mass: ``"l1"``
    (default, mergekit: restore the delta's L1 norm) or ``"inverse_density"``
    (the DARE paper: divide by the keep probability). ``int8_mask`` is accepted
    for mergekit configs; masks here are boolean either way.
    """
    if not tensors:
        return base
    base32 = base.float()
    deltas = torch.empty((len(tensors), *base.shape), dtype=torch.float32, device=base.device)
    for i, t in enumerate(tensors):
        delta = task_vector(base32, t, deltas[i])
        d = density[i] if density is not None else 1.0
        if sparsifier == "magnitude":
            sparsify.magnitude(delta, d, rescale=rescale, how=rescale_method)
        elif sparsifier == "random":
            sparsify.random_drop(delta, d, rescale=rescale, how=rescale_method, generator=generator)
        elif sparsifier == "magnitude_outliers":
            sparsify.magnitude_outliers(delta, d, gamma[i], rescale=rescale, how=rescale_method)
        elif sparsifier == "della":
            sparsify.della_magprune(delta, d, epsilon[i], rescale=rescale, how=rescale_method, generator=generator)
        if weight[i] != 1:
            delta.mul_(weight[i])
    if consensus:
        mixed, divisor = sign_consensus(deltas, weight, normalize)
    else:
        mixed = ordered_sum(deltas)
        total = float(sum(weight))
        divisor = 1.0 if abs(total) < 1e-8 else total
    if normalize:
        mixed.div_(divisor)
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return mixed.add_(base32).to(base.dtype)


def task_vector(base32: torch.Tensor, source: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``source - base`` in float32, into ``out`` when given (every task-vector merge computes it this way)."""
    out = torch.empty_like(base32) if out is None else out
    return out.copy_(source).sub_(base32)  # faster than a mixed-dtype subtraction into `out`


def ordered_sum(rows: torch.Tensor) -> torch.Tensor:
    """``rows.sum(0)`` as in-order adds: ``(r0 + r1) + r2 ...``.

    A reduction kernel's summation order depends on the tensor's shape (CUDA
    splits short rows across threads), so a tensor's sum computed alone (export)
    and inside a block of tensors (the resident merger) could differ in the last
    bit; in-order adds give the same floats for every shape on every device.
    """
    out = rows[0] + rows[1] if len(rows) > 1 else rows[0].clone()
    for row in rows[2:]:
        out.add_(row)
    return out


def sign_consensus(weighted: torch.Tensor, weight: Sequence[float | torch.Tensor], with_divisor: bool,
                   nonnegative: bool | None = None):
    """TIES disjoint merge of stacked weighted deltas (consumes ``weighted``).

    The elected sign ``e`` is + where the sum is >= 0, else -. An entry agrees
    when ``x * e > 0`` (zeros never agree), so ``relu(x * e) * e`` is its
    contribution and ``sign(relu(x * e))`` its agreement; the divisor sums the
    weights of agreeing entries (exact 0 -> 1). Float passes only: boolean masks
    are several times slower on CPU. A weight may be a tensor of per-entry
    weights (several tensors merged at once, each with its own weight); then
    ``nonnegative`` must say whether all weights are >= 0 (reading that from the
    tensors would wait for the device).
    """
    elected = ordered_sum(weighted).sign_().add_(0.5).sign_()
    mixed = divisor = None
    for row, w in zip(weighted, weight):
        agreeing = row.mul_(elected).relu_()
        # 0 + x is x for these non-negative floats: the first row starts both running sums
        if mixed is None:
            mixed = agreeing
            if with_divisor:
                divisor = torch.sign(agreeing)
                if isinstance(w, torch.Tensor) or w != 1:
                    divisor.mul_(w)
            continue
        mixed.add_(agreeing)
        if with_divisor:
            # agreement is 0 or 1, so the product is exact and either form adds the same float
            if isinstance(w, torch.Tensor):
                divisor.addcmul_(agreeing.sign_(), w)
            else:
                divisor.add_(agreeing.sign_(), alpha=w)
    mixed.mul_(elected)
    if with_divisor:
        if nonnegative is None:
            nonnegative = all(w >= 0 for w in weight)
        if nonnegative:
            # Non-negative weights: the divisor is 0 only where nothing agrees and
            # the sum is 0 too, so any positive floor gives mixed / floor = 0.
            divisor.clamp_(min=1e-30)
        else:
            divisor.masked_fill_(divisor == 0, 1.0)
    return mixed, divisor


_VARIANTS = {
    # name: (sparsifier, sign consensus, normalize default, rescale default)
    "task_arithmetic": (None, False, False, False),
    "ties": ("magnitude", True, True, False),
    "dare_ties": ("random", True, False, True),
    "dare_linear": ("random", False, False, True),
    "breadcrumbs": ("magnitude_outliers", False, False, False),
    "breadcrumbs_ties": ("magnitude_outliers", True, False, False),
    "della": ("della", True, True, True),
    "della_linear": ("della", False, False, True),
}

for _name, (_sparsifier, _consensus, _normalize, _rescale) in _VARIANTS.items():
    _source = {"weight": REQUIRED}
    if _sparsifier is not None:
        _source["density"] = 1.0
    if _sparsifier == "magnitude_outliers":
        _source["gamma"] = 0.01
    if _sparsifier == "della":
        _source["epsilon"] = 0.15
    _global = {"normalize": _normalize, "rescale": _rescale, "rescale_method": "l1", "lambda": 1.0, "int8_mask": False}
    register(
        MergeMethod(
            name=_name,
            kernel=partial(generalized_task_arithmetic, sparsifier=_sparsifier, consensus=_consensus),
            source_params=_source,
            global_params=_global,
            random=_sparsifier in ("random", "della"),
        )
    )
