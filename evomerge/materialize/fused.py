"""Task-vector merges of the resident merger as compiled passes over the source weights (CPU).

A TIES candidate made of eager operations reads and writes each block ~60
times: per source the task vector, its magnitude, the trim, the sign, the
weight; then the sign election, agreement, divisor, lambda, base and cast. On a
CPU those passes are memory-bound. Here ``torch.compile`` turns them into
kernels: ``merge`` (task vectors from the sources, each trimmed at its cut --
the k-th largest magnitude and the index of the last tie kept -- signed and
weighted, consensus or sum, normalize, lambda, base, cast: one pass over a run
of tensors that share their parameters and cuts, stored straight into the
live model, with the sum of what it stored for the finiteness check) and, to
find the cuts, ``row_matches`` (per row of ``ROW`` entries, how many
magnitudes equal a tensor's cut: where the ties kept end, for cuts looked up
in an exact table of the magnitude index) or ``high_halves`` (the high 16 bits
of ``|source - base|`` in one pass, where the index finds a cut's bucket
members in tensors without a table). They
perform the float operations of the eager code (``blockwise.merge_block``,
``sign_consensus``, ``ordered_sum``) in the same order with one rounding each:
Inductor's CPU code does not contract multiply-adds, and divides truly, as
eager CPU code divides by a scalar. The result is equal bit for bit
(``tests/test_fused.py``; the resident-vs-export tests run with fusion forced
on).

CPU only for now: eager CUDA divides by a scalar through its reciprocal, which
a compiled true division would not reproduce, so the CUDA route stays eager
until a GPU run proves a compiled one equal. When compiling fails (no C++
compiler), the eager passes run instead; the failure is logged once.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable

import numpy as np
import torch

from evomerge.methods.generalized_task_arithmetic import ordered_sum, sign_consensus, task_vector
from evomerge.methods.magnitude_index import high_half

log = logging.getLogger(__name__)

#: Spans shorter than this run eagerly: a compiled call costs ~30 us whatever its size.
MIN_NUMEL = 1 << 14
#: ``nth_equal`` counts matches per row of this many entries, then searches one row
ROW = 1 << 12


def _high_halves(base: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    # the int16 view's halves, not a shift: the shift and narrowing vectorize worse (1.2 vs 0.7 ms per 3M)
    return high_half((source.float() - base.float()).abs()).contiguous()


def _row_matches(base: torch.Tensor, sources, values: torch.Tensor) -> torch.Tensor:
    # compared as floats: a bit-pattern view compiles to a scalar loop; for a finite value, equal floats
    # are equal bits (the magnitudes hold no -0)
    base32 = base.float()
    return torch.stack([((source.float() - base32).abs() == values[i]).view(-1, ROW).sum(1, dtype=torch.int32)
                        for i, source in enumerate(sources)])


def _rows(base32: torch.Tensor, sources, cuts, weight) -> list[torch.Tensor]:
    """Weighted (trimmed) task vectors: ``copysign(trimmed |delta|, delta) * w``, the floats of
    blockwise's trim, sign and weight.

    ``cuts[i]`` is ``None`` (source i kept whole) or a (value, last) pair: the
    entries whose magnitude is below ``value``, or equal to it at an index past
    ``last``, are dropped (NaN is kept, as by the eager threshold), and all of
    them when ``value`` is +inf (a tensor cut to nothing).
    """
    rows = []
    for i, source in enumerate(sources):
        delta = source.float() - base32
        if cuts[i] is not None:
            value, last = cuts[i]
            magnitude = delta.abs()
            index = torch.arange(delta.numel(), device=delta.device)
            drop = (magnitude < value) | ((magnitude == value) & (index > last)) | (value == math.inf)
            delta = torch.copysign(torch.where(drop, 0.0, magnitude), delta)
        rows.append(delta * weight[i])
    return rows


def _merge(base: torch.Tensor, sources, cuts, weight: torch.Tensor, divisor: torch.Tensor, lam: torch.Tensor,
           out: torch.Tensor, *, consensus: bool, normalize: bool, nonnegative: bool) -> torch.Tensor:
    base32 = base.float()
    rows = _rows(base32, sources, cuts, weight)
    if consensus:
        mixed, agreement = sign_consensus(rows, list(weight), normalize, nonnegative)
        if normalize:
            mixed = mixed / agreement
    else:
        mixed = ordered_sum(rows) / divisor
    merged = (mixed * lam + base32).to(base.dtype)
    # compiled, the kernel stores into ``out`` directly, and the sum shares its pass
    out.copy_(merged)
    return merged.float().sum()


@functools.cache
def _compiled(name: str):
    # one compiled variant per dtype, source count and flag combination a search uses: allow more than
    # dynamo's default 8 before it falls back to running the Python eagerly
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    # emulated casts: the merge's sum must read the stored (rounded) values, or a float16 overflow to inf
    # would pass the finiteness screen
    return torch.compile({"high_halves": _high_halves, "merge": _merge, "row_matches": _row_matches}[name],
                         dynamic=True,
                         options={"emulate_precision_casts": True})


_broken = False


def _run(name: str, *args, **kwargs):
    """The compiled ``name`` on ``args``; ``None`` off a CPU, for short spans, or when compiling failed."""
    global _broken
    if _broken or args[0].device.type != "cpu" or args[0].numel() < MIN_NUMEL:
        return None
    try:
        return _compiled(name)(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 -- any compiler failure falls back to the eager passes
        _broken = True
        log.warning("fused merge kernels unavailable (%s: %s); using eager passes", type(exc).__name__, exc)
        return None


def high_halves(base: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``high_half(|source - base|)`` of the float32 magnitudes TIES cuts, contiguous, in one pass where compiled."""
    out = _run("high_halves", base, source)
    return out if out is not None else high_half(task_vector(base.float(), source).abs_()).contiguous()


def nth_equal(base: torch.Tensor, sources, values: list[float], js: list[int]) -> list[int]:
    """Per source ``i``, the position of the ``js[i]``-th entry (from 1, in index order) whose
    ``|sources[i] - base|`` is ``values[i]`` (finite; there are at least ``js[i]``).

    Compiled: one pass counts the matches per row of ``ROW`` entries for all
    sources, and only the row holding each j-th is searched.
    """
    full = base.numel() // ROW * ROW
    counts = _run("row_matches", base[:full], [t[:full] for t in sources],
                  torch.tensor(values, dtype=torch.float32)) if full else None
    found = []
    for i, (source, value, j) in enumerate(zip(sources, values, js)):
        start, stop = 0, base.numel()
        if counts is not None:
            reached = counts[i].numpy().cumsum()
            row = int(np.searchsorted(reached, j))
            start, stop = row * ROW, min(row * ROW + ROW, stop)
            j -= int(reached[row - 1]) if row else 0
        equal = task_vector(base[start:stop].float(), source[start:stop]).abs_() == value
        found.append(start + int(equal.nonzero()[j - 1]))
    return found


def magnitude_at(base: torch.Tensor, source: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``positions -> |source - base|`` at those positions, in float32: the magnitudes of ``high_halves``."""
    return lambda positions: task_vector(base[positions].float(), source[positions]).abs_()


def merge(base: torch.Tensor, sources, cuts, *, out: torch.Tensor, consensus: bool, weight: list[float],
          normalize: bool, divisor: float, lam: float) -> torch.Tensor:
    """One span's merge, stored into ``out`` (the base's dtype), from the sources and their TIES cuts.

    ``cuts[i]``: ``None`` (source i keeps every entry) or ``(value, last)``,
    the span's k-th largest magnitude of source i's task vector and its index
    in the span (see ``_rows``); ``weight`` are the sources' weights (the
    consensus divisor sums those that agree), ``divisor`` the sum's normalizer
    without consensus (1: none). Compiled on a CPU for spans of at least
    ``MIN_NUMEL`` entries, eager otherwise; both give the same floats.
    Returns the float32 sum of the merged values, a screen for NaN and Inf.
    """
    scalar = functools.partial(torch.tensor, dtype=torch.float32)
    cuts = [None if c is None else (scalar(c[0]), torch.tensor(c[1], dtype=torch.int64)) for c in cuts]
    args = (base, list(sources), cuts, scalar(weight), scalar(divisor), scalar(lam), out)
    flags = dict(consensus=consensus, normalize=normalize, nonnegative=all(w >= 0 for w in weight))
    total = _run("merge", *args, **flags)
    return total if total is not None else _merge(*args, **flags)
