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

import torch

from evomerge.methods.sparsify import where_equal

_SEG = 1 << 40  # segment stride in the packed cumulative keys (more than any tensor's entry count)


def high_half(magnitude: torch.Tensor) -> torch.Tensor:
    """The high 16 bits of each non-negative float32, as int16 in [0, 32767], read in place where possible."""
    if sys.byteorder == "little":
        return magnitude.view(torch.int16)[1::2]
    return (magnitude.view(torch.int32) >> 16).to(torch.int16)


def expand(values, sizes, *, dtype: torch.dtype, device) -> torch.Tensor:
    """``values[s]`` repeated ``sizes[s]`` times, end to end.

    ``values`` are numbers, or 0-dim tensors on ``device`` (each fill then reads
    its value there: no host sync on CUDA). A fill per tensor: for the few
    dozen tensors of a block this is several times faster than
    ``torch.repeat_interleave`` on a CPU, and far faster on CUDA, whose kernel
    writes a whole tensor's run per thread (73 ms for four 64M-entry blocks on
    an H100).
    """
    out = torch.empty(sum(sizes), dtype=dtype, device=device)
    start = 0
    for value, n in zip(values, sizes):
        out[start:start + n].fill_(value)
        start += n
    return out


class MagnitudeIndex:
    """Bucketed magnitude counts of the tensors of one block (see the module doc)."""

    def __init__(self, magnitude: torch.Tensor, sizes: list[int]) -> None:
        self.sizes = list(sizes)
        device = magnitude.device
        starts = [0]
        for n in sizes:
            starts.append(starts[-1] + n)
        self.offsets = starts
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

    def trim_(self, magnitude: torch.Tensor, ks: list[int]) -> torch.Tensor:
        """Zero all but the ``ks[s]`` largest entries of each tensor ``s`` of ``magnitude``, in place.

        ``magnitude`` must hold the very values the index was built from. The
        bookkeeping stays on the device: one host sync (the bucket members'
        count) per call, and no per-tensor kernel launches.
        """
        sizes = self.sizes
        device = magnitude.device
        # per tensor, entries <= bound are zeroed: -inf keeps a tensor whole, +inf drops it (k = 0)
        bound_of = [float("inf") if k <= 0 < n else float("-inf") for k, n in zip(ks, sizes)]
        need = [s for s, (k, n) in enumerate(zip(ks, sizes)) if 0 < k < n]
        if not need:
            if any(b > 0 for b in bound_of):
                self._zero_at_or_below_(magnitude, _on(bound_of, torch.float32, device))
            return magnitude
        segs = _on(need, torch.int64, device)
        k = _on([ks[s] for s in need], torch.int64, device)
        pos = torch.searchsorted(self.keys, segs * _SEG + k)
        bucket = self.buckets[pos]
        above = torch.where(pos > self.first[segs], self.keys[(pos - 1).clamp(min=0)] - segs * _SEG, 0)
        # members of each tensor's chosen bucket, over the whole block in one pass (-1 matches nothing)
        target = torch.full((len(sizes),), -1, dtype=torch.int16, device=device)
        target[segs] = bucket.to(torch.int16)
        members = where_equal(high_half(magnitude), self._per_entry(target))
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
        bounds = _on(bound_of, torch.float32, device)
        bounds[segs] = torch.nextafter(cut, torch.full_like(cut, -1.0))
        self._zero_at_or_below_(magnitude, bounds)
        # entries equal to the cut beyond the k kept: sorted positions after p, within the cut's run
        last_kept = torch.full((len(sizes),), members.numel(), dtype=torch.int64, device=device)
        last_kept[segs] = p
        run_end = torch.zeros(len(sizes), dtype=torch.int64, device=device)
        run_end[segs] = torch.searchsorted(order_key, cut_key, right=True)
        seg_sorted = (order_key >> 16).long()
        j = torch.arange(members.numel(), device=device)
        dropped = (j > last_kept[seg_sorted]) & (j < run_end[seg_sorted])
        magnitude.index_put_((members,), magnitude[members].masked_fill_(dropped, 0.0))
        return magnitude

    def _per_entry(self, values: torch.Tensor) -> torch.Tensor:
        """One value per tensor (a tensor on the device) repeated over that tensor's entries."""
        parts = values.tolist() if values.device.type == "cpu" else values.unbind()
        return expand(parts, self.sizes, dtype=values.dtype, device=values.device)

    def _zero_at_or_below_(self, magnitude: torch.Tensor, bounds: torch.Tensor) -> None:
        """Zero each tensor's entries at or below its bound (-inf: none, +inf: all).

        One masked fill on CUDA; a threshold per tensor on a CPU, where a masked
        fill over a block is ~15x slower. The two differ only on NaN entries, which
        only a broken source produces: the fill keeps them (the candidate then
        fails its finite check), the threshold zeroes them.
        """
        if magnitude.device.type != "cpu":
            magnitude.masked_fill_(magnitude <= self._per_entry(bounds), 0.0)
            return
        for a, b, bound in zip(self.offsets, self.offsets[1:], bounds.tolist()):
            if bound == float("inf"):
                magnitude[a:b].zero_()
            elif bound > float("-inf"):
                torch.nn.functional.threshold(magnitude[a:b], bound, 0.0, inplace=True)


def _on(values: list, dtype: torch.dtype, device) -> torch.Tensor:
    """A small host list as a device tensor, copied without waiting for the device (pinned, non-blocking)."""
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t
