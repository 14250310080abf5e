"""Task-vector merges over whole blocks of tensors: the resident merger's fast path.

Export runs the task-vector kernel (``methods.generalized_task_arithmetic``)
tensor by tensor, a dozen torch operations each. A search candidate of a small
model is then dominated by per-operation overhead, and every candidate redoes
the magnitude selection of TIES from scratch. Here the same arithmetic runs on
a block of tensors laid end to end (``materialize.pool``): elementwise stages
are one operation per block, per-tensor parameters (weights, densities,
lambda) become per-entry vectors where they differ, and TIES cuts come from a
``MagnitudeIndex`` built once per (base, source) pair. Every float operation is
the one export performs on the same values, so the result is equal bit for bit
(``tests/test_resident.py``); what cannot be vectorized without changing the
rounding (L1 rescale sums, divisions by a per-tensor total) stays per tensor.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Sequence
from typing import Any

import torch

from evomerge.materialize import fused
from evomerge.materialize.pool import Block
from evomerge.methods import sparsify
from evomerge.methods.generalized_task_arithmetic import ordered_sum, sign_consensus, task_vector
from evomerge.methods.magnitude_index import MagnitudeIndex, expand, high_half

#: method -> (sparsifier, sign consensus), as registered in generalized_task_arithmetic
BLOCKWISE = {
    "task_arithmetic": (None, False),
    "ties": ("magnitude", True),
    "dare_ties": ("random", True),
    "dare_linear": ("random", False),
}


def per_entry(values: Sequence[float], sizes: Sequence[int], device) -> float | torch.Tensor:
    """One value per tensor as a scalar when all are equal, else expanded to one per entry (float32)."""
    first = values[0]
    if all(v == first for v in values):
        return float(first)
    return expand(values, sizes, dtype=torch.float32, device=device)


def keep_counts(density: Sequence[float], sizes: Sequence[int]) -> list[int]:
    """Entries TIES keeps per tensor at these densities (``sparsify.keep_count``)."""
    return [sparsify.keep_count(d, n) for d, n in zip(density, sizes)]


def magnitude_index(block: Block, base: torch.Tensor, source: torch.Tensor, *, exact: bool = False) -> MagnitudeIndex:
    """The index of ``|source - base|`` over ``block`` (both flat, on one device); ``exact``: with the exact
    tables of the tensors with few distinct magnitudes, which the fused route's cuts look up (CPU)."""
    if not exact:
        return MagnitudeIndex(fused.high_halves(base, source), block.sizes)
    magnitude = task_vector(base.float(), source).abs_()
    return MagnitudeIndex(high_half(magnitude).contiguous(), block.sizes, magnitude)


def merge_block(block: Block, base: torch.Tensor, sources: Sequence[torch.Tensor], kwargs: Sequence[dict[str, Any]],
                *, method: str, generators: Sequence[torch.Generator] | None = None,
                indexes: Sequence[MagnitudeIndex] | None = None, fused: bool = False,
                out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The merge of every tensor of ``block`` (flat, in the base's dtype), as export computes it tensor by tensor.

    ``kwargs[s]`` are the planned kernel arguments of tensor ``s``; ``generators``
    (DARE) are the per-tensor generators export would seed; ``indexes`` (TIES)
    one per source. ``fused``: the tail after the weighted deltas runs through
    ``materialize.fused`` per run of tensors sharing their parameters. The
    result is stored into ``out`` when given (flat, the base's dtype: the live
    model's storage) and returned with its float32 sum, a screen for NaN and
    Inf that the fused kernels compute in the same pass.
    """
    sparsifier, consensus = BLOCKWISE[method]
    out = torch.empty(block.numel, dtype=base.dtype, device=base.device) if out is None else out
    if fused and sparsifier != "random" and not (sparsifier and any(kw["rescale"] for kw in kwargs)):
        return out, _merge_fused(block, base, sources, kwargs, consensus, indexes, out)
    sizes = block.sizes
    device = base.device
    base32 = base.float()
    deltas = torch.empty((len(sources), block.numel), dtype=torch.float32, device=device)
    weights = []
    for i, source in enumerate(sources):
        delta = task_vector(base32, source, deltas[i])
        if sparsifier is not None:
            density = [kw["density"][i] for kw in kwargs]
            if sparsifier == "magnitude":
                _trim_(delta, block, density, kwargs, indexes[i])
            else:
                _drop_(delta, block, density, kwargs, generators)
        weight = per_entry([kw["weight"][i] for kw in kwargs], sizes, device)
        if not (isinstance(weight, float) and weight == 1):
            delta.mul_(weight)
        weights.append(weight)
    normalize = [bool(kw["normalize"]) for kw in kwargs]
    if consensus:
        nonnegative = all(w >= 0 for kw in kwargs for w in kw["weight"])
        mixed, divisor = sign_consensus(deltas, weights, any(normalize), nonnegative)
        if all(normalize):
            mixed.div_(divisor)
        else:
            for (a, b), norm in zip(block.spans, normalize):
                if norm:
                    mixed[a:b].div_(divisor[a:b])
    else:
        mixed = ordered_sum(deltas)
        if any(normalize):
            totals = [float(sum(kw["weight"])) for kw in kwargs]
            divisors = [(1.0 if abs(t) < 1e-8 else t) if norm else 1.0 for t, norm in zip(totals, normalize)]
            # by a scalar, as export divides: CUDA divides by a scalar through its reciprocal, so
            # a per-entry divisor tensor would round differently
            if all(d == divisors[0] for d in divisors):
                mixed.div_(divisors[0])
            else:
                for (a, b), d in zip(block.spans, divisors):
                    if d != 1:
                        mixed[a:b].div_(d)
    lam = per_entry([kw["lambda_"] for kw in kwargs], sizes, device)
    if not (isinstance(lam, float) and lam == 1):
        mixed.mul_(lam)
    out.copy_(mixed.add_(base32))
    return out, out.sum(dtype=torch.float32)


def _merge_fused(block: Block, base: torch.Tensor, sources: Sequence[torch.Tensor], kwargs, consensus: bool,
                 indexes: Sequence[MagnitudeIndex] | None, out: torch.Tensor) -> torch.Tensor:
    """``merge_block`` through ``materialize.fused`` (CPU) into ``out``; returns the float32 sum of the result.

    Each source's TIES cuts come from its magnitude index (``MagnitudeIndex.points``:
    an exact table's lookup, else the high halves of the tensor's magnitudes,
    one compiled pass) and are applied inside the merge (per tensor: the k-th
    largest magnitude and the position of the last tie kept), so no trimmed
    magnitudes are written. One ``fused.merge`` runs per run of consecutive
    tensors with equal parameters and cuts.
    """
    sizes, offsets = block.sizes, block.offsets
    cuts = []  # per source and tensor: None (kept whole) or (k-th largest magnitude, its block position)
    ties = collections.defaultdict(list)  # tensor -> (source, value, j): cuts whose last tie kept is to be found
    for i, source in enumerate(sources):
        ks = keep_counts([kw["density"][i] for kw in kwargs], sizes) if indexes is not None else sizes
        if all(k >= n for k, n in zip(ks, sizes)):
            cuts.append([None] * len(sizes))
            continue
        points, tied = indexes[i].points(
            ks, lambda a, b, t=source: fused.high_halves(base[a:b], t[a:b]), fused.magnitude_at(base, source))
        cuts.append(points)
        for s, (value, j) in tied.items():
            ties[s].append((i, value, j))
    for s, asks in ties.items():  # one pass over a tensor for all its sources' ties
        a, b = offsets[s], offsets[s + 1]
        found = fused.nth_equal(base[a:b], [sources[i][a:b] for i, _, _ in asks], [v for _, v, _ in asks],
                                [j for _, _, j in asks])
        for (i, value, _), position in zip(asks, found):
            cuts[i][s] = (value, a + position)

    def params(s: int) -> tuple:
        kw = kwargs[s]
        return tuple(kw["weight"]), bool(kw["normalize"]), kw["lambda_"]

    totals = []
    for ((weight, normalize, lam), span_cuts), run in itertools.groupby(
            range(len(sizes)), key=lambda s: (params(s), tuple(c[s] for c in cuts))):
        run = list(run)
        a, b = offsets[run[0]], offsets[run[-1] + 1]
        total = float(sum(weight))
        divisor = (1.0 if abs(total) < 1e-8 else total) if normalize else 1.0
        totals.append(fused.merge(
            base[a:b], [t[a:b] for t in sources], [c if c is None else (c[0], c[1] - a) for c in span_cuts],
            out=out[a:b], consensus=consensus, weight=list(weight), normalize=normalize, divisor=divisor, lam=lam))
    return torch.stack(totals).sum()


def _trim_(delta: torch.Tensor, block: Block, density: list[float], kwargs, index: MagnitudeIndex) -> None:
    """``sparsify.magnitude`` on every tensor of the block, cuts from the index."""
    spans = block.spans
    trimmed = [s for s, d in enumerate(density) if d < 1]
    if not trimmed:
        return
    magnitude = delta.abs()
    rescaled = [s for s in trimmed if kwargs[s]["rescale"]]
    before = {s: float(magnitude[slice(*spans[s])].sum()) for s in rescaled if kwargs[s]["rescale_method"] == "l1"}
    index.trim_(magnitude, keep_counts(density, block.sizes))
    torch.copysign(magnitude, delta, out=delta)
    for s in rescaled:
        sparsify.rescale_(delta[slice(*spans[s])], before.get(s, 0.0), True, kwargs[s]["rescale_method"], density[s])


def _drop_(delta: torch.Tensor, block: Block, density: list[float], kwargs, generators) -> None:
    """``sparsify.random_drop`` on every tensor of the block, each tensor drawing from its own generator."""
    spans = block.spans
    dropped = [s for s, d in enumerate(density) if d < 1]
    if not dropped:
        return
    rescaled = [s for s in dropped if kwargs[s]["rescale"]]
    before = {s: float(delta[slice(*spans[s])].abs().sum()) for s in rescaled if kwargs[s]["rescale_method"] == "l1"}
    draw = torch.zeros_like(delta)
    for s in dropped:
        a, b = spans[s]
        torch.rand(b - a, generator=generators[s], out=draw[a:b])
    # tensors kept whole draw 0 against density 1: a factor of exactly 1
    keep = per_entry([d if d < 1 else 1.0 for d in density], block.sizes, delta.device)
    delta.mul_(draw.neg_().add_(keep).sign_().relu_())
    for s in rescaled:
        sparsify.rescale_(delta[slice(*spans[s])], before.get(s, 0.0), True, kwargs[s]["rescale_method"], density[s])
