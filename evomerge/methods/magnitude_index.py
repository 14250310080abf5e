"""Precomputed magnitude statistics: exact TIES cuts for many tensors at once, without a sort.

A search trims the same task vectors over and over, each candidate with other
densities. ``MagnitudeIndex`` is built once per (base, source) pair over a
block of tensors laid end to end: per tensor, the occupied buckets of the high
16 bits of ``|tau|`` (non-negative floats order like their bit patterns) with
cumulative counts -- typically a few thousand numbers per tensor, whatever its
size, so the index adds well under 1% to the pool for real models. For a
density it looks up, per tensor, the bucket holding the k-th largest magnitude
and how many entries lie above it; the exact cut then only needs that bucket's
members, found for every tensor of the block in one compare pass. The cut and
its tie handling are those of ``sparsify.RankCut`` (entries equal to the cut are
kept lowest index first, so exactly k survive), hence bit-identical results.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

_SEG = 1 << 40  # segment stride in the packed cumulative keys (more than any tensor's entry count)


def high_half(magnitude: torch.Tensor) -> torch.Tensor:
    """The high 16 bits of each non-negative float32, as int16 in [0, 32767], read in place where possible."""
    if sys.byteorder == "little":
        return magnitude.view(torch.int16)[1::2]
    return (magnitude.view(torch.int32) >> 16).to(torch.int16)


def expand(values, sizes, *, dtype: torch.dtype, device) -> torch.Tensor:
    """``values[s]`` repeated ``sizes[s]`` times, end to end.

    A fill per tensor: for the few dozen tensors of a block this is several
    times faster than ``torch.repeat_interleave``.
    """
    out = torch.empty(sum(sizes), dtype=dtype, device=device)
    start = 0
    for value, n in zip(values, sizes):
        out[start:start + n].fill_(value)
        start += n
    return out


@dataclass
class Cuts:
    """Per-tensor cuts of one block: what ``MagnitudeIndex.cut`` returns.

    ``bounds[s]`` is ``None`` to keep every entry of tensor ``s``, else an entry
    is kept when its magnitude is ``> bounds[s]``. ``zero[s]``
    drops tensor ``s`` whole (k = 0). ``drop`` indexes (into the block) the
    entries tied with their tensor's cut beyond the k kept.
    """

    bounds: list[float | None]
    zero: list[bool]
    drop: torch.Tensor


class MagnitudeIndex:
    """Bucketed magnitude counts of the tensors of one block (see the module doc)."""

    def __init__(self, magnitude: torch.Tensor, sizes: list[int]) -> None:
        self.sizes = list(sizes)
        device = magnitude.device
        starts = [0]
        for n in sizes:
            starts.append(starts[-1] + n)
        self.starts = torch.tensor(starts, dtype=torch.int64, device=device)
        high = high_half(magnitude)
        keys, buckets, first = [], [], [0]
        for s, (a, b) in enumerate(zip(starts, starts[1:])):
            counts = torch.bincount(high[a:b])
            occupied = counts.nonzero().squeeze(1).flip(0)  # buckets, largest magnitudes first
            keys.append(counts[occupied].cumsum(0) + s * _SEG)
            buckets.append(occupied)
            first.append(first[-1] + occupied.numel())
        self.keys = torch.cat(keys) if keys else torch.zeros(0, dtype=torch.int64, device=device)
        self.buckets = torch.cat(buckets).to(torch.int64) if buckets else self.keys.clone()
        self.first = torch.tensor(first, dtype=torch.int64, device=device)

    @property
    def nbytes(self) -> int:
        """Memory the index holds."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.buckets, self.first, self.starts))

    def cut(self, magnitude: torch.Tensor, ks: list[int]) -> Cuts:
        """Cuts keeping the ``ks[s]`` largest entries of each tensor ``s`` of ``magnitude``.

        ``magnitude`` must hold the very values the index was built from.
        """
        sizes = self.sizes
        device = magnitude.device
        bounds: list[float | None] = [None] * len(sizes)
        zero = [k <= 0 < n for k, n in zip(ks, sizes)]
        need = [s for s, (k, n) in enumerate(zip(ks, sizes)) if 0 < k < n]
        if not need:
            return Cuts(bounds, zero, torch.zeros(0, dtype=torch.int64, device=device))
        segs = torch.tensor(need, dtype=torch.int64, device=device)
        k = torch.tensor([ks[s] for s in need], dtype=torch.int64, device=device)
        pos = torch.searchsorted(self.keys, segs * _SEG + k)
        bucket = self.buckets[pos]
        above = torch.where(pos > self.first[segs], self.keys[(pos - 1).clamp(min=0)] - segs * _SEG, 0)
        # members of each tensor's chosen bucket, over the whole block in one pass
        target = [-1] * len(sizes)
        for s, b in zip(need, bucket.tolist()):
            target[s] = b
        members = (high_half(magnitude) == expand(target, sizes, dtype=torch.int16, device=device)).nonzero().squeeze(1)
        seg_of = torch.searchsorted(self.starts, members, right=True) - 1
        low = magnitude.view(torch.int32)[members] & 0xFFFF
        # within a tensor: largest first; stable, so equal values stay in index order. int32 keys
        # where they fit (under 2**15 tensors in the block) halve the radix sort's passes on CUDA
        key_dtype = torch.int32 if len(sizes) < 1 << 15 else torch.int64
        order_key, perm = torch.sort((seg_of * (1 << 16) + (0xFFFF - low)).to(key_dtype), stable=True)
        members = members[perm]
        p = torch.searchsorted(order_key, (segs * (1 << 16)).to(key_dtype)) + (k - above) - 1
        cut_key = order_key[p]
        cut_bits = (bucket << 16) | (0xFFFF - (cut_key - segs * (1 << 16)))
        cut = cut_bits.to(torch.int32).view(torch.float32)
        bound = torch.nextafter(cut, torch.tensor(-1.0, device=device)).tolist()
        for s, b in zip(need, bound):
            bounds[s] = b
        # entries equal to the cut beyond the k kept: the rest of the cut's run in the sorted members
        run_end = torch.searchsorted(order_key, cut_key, right=True)
        extra = (run_end - p - 1).tolist()
        drop = [members[q + 1: q + 1 + e] for q, e in zip(p.tolist(), extra) if e > 0]
        drop_t = torch.cat(drop) if drop else torch.zeros(0, dtype=torch.int64, device=device)
        return Cuts(bounds, zero, drop_t)
