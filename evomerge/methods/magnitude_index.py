"""Precomputed magnitude statistics: exact TIES cuts for many tensors at once, without a sort.

A search trims the same task vectors over and over, each candidate with other
densities. ``MagnitudeIndex`` is built once per (base, source) pair over a
block of tensors laid end to end: per tensor, the occupied buckets of the high
16 bits of ``|tau|`` (non-negative floats order like their bit patterns) with
cumulative counts -- typically a few thousand numbers per tensor, whatever its
size, so the index adds well under 1% to the pool for real models. For a
density it looks up, per tensor, the bucket holding the k-th largest magnitude
and how many entries lie above it; the exact cut then only needs that bucket's
members, found by one compare pass over the block. The cut and
its tie handling are those of ``sparsify.RankCut`` (entries equal to the cut are
kept lowest index first, so exactly k survive), hence bit-identical results.

Task vectors of bfloat16 models take few distinct magnitudes (differences of
two 8-bit mantissas: ~0.5% of the entries of the medium zoo's tensors), so a
bucket of high halves mixes several values and holds ~1% of a tensor, and
finding its members costs passes over the block. For such tensors the index
can also hold an exact table, every distinct magnitude with its cumulative
count (``points``; at most one per ``EXACT_RATIO`` entries, so at most 4% of
bfloat16 weights, ~2% of the medium zoo's pool): the k-th largest is then a
lookup, and only a cut that falls inside a run of equal magnitudes needs to
find where the kept ones end.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

_SEG = 1 << 40  # segment stride in the packed cumulative keys (more than any tensor's entry count)
#: a tensor gets an exact table when it has at most one distinct magnitude per this many entries; at
#: 8 bytes per distinct magnitude, tables take at most 8 / EXACT_RATIO bytes per entry (4% of bfloat16 weights)
EXACT_RATIO = 100
_INF_BITS = 0x7F800000  # float32 +inf: tables hold finite magnitudes only (NaN, inf take the bucket route)


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


@dataclass(frozen=True)
class Cut:
    """TIES cuts of the tensors of one block, as ``MagnitudeIndex.cut`` finds them.

    Tensor ``s`` keeps the entries whose magnitude is not below ``values[s]``
    (its k-th largest; -inf: all; NaN survives, as export's threshold lets it)
    except ``members[dropped]``, entries equal to it beyond the k kept (ties go
    to the lowest indices: those after position ``last[s]``); ``emptied``
    tensors keep nothing.
    """

    values: torch.Tensor  # float32, one per tensor, on the block's device: -inf whole, +inf emptied
    last: torch.Tensor  # block position of each tensor's k-th largest (-1: no cut): ties after it are dropped
    emptied: tuple[int, ...]  # the tensors cut to nothing (k = 0)
    members: torch.Tensor  # block positions of the cut buckets' entries (int64)
    dropped: torch.Tensor  # per member: whether it is dropped as a surplus tie

    @property
    def trimmed(self) -> bool:
        """Whether any tensor loses entries (a bucket was searched for every tensor with a cut)."""
        return bool(self.emptied) or self.members.numel() > 0


class MagnitudeIndex:
    """Bucketed magnitude counts of the tensors of one block (see the module doc).

    The counts live in host memory: a cut's bucket, its member count and the
    sorted position of the k-th largest are looked up there, so trimming on CUDA
    never waits for the device (the members are found with a known count).
    """

    def __init__(self, high: torch.Tensor, sizes: list[int], magnitude: torch.Tensor | None = None) -> None:
        """Index the magnitudes whose high halves (``high_half``) are ``high``, tensors of ``sizes`` end to end.

        With ``magnitude`` (the float32 magnitudes themselves, on a CPU) the
        tensors with few distinct values also get exact tables (``points``).
        """
        self.sizes = list(sizes)
        self.offsets = list(itertools.accumulate(sizes, initial=0))
        self.starts = torch.tensor(self.offsets, dtype=torch.int64, device=high.device)
        keys, buckets, first = [], [], [0]
        for s, (a, b) in enumerate(itertools.pairwise(self.offsets)):
            counts = torch.bincount(high[a:b]).cpu().numpy()
            occupied = np.flatnonzero(counts)[::-1]  # buckets, largest magnitudes first
            keys.append(counts[occupied].cumsum() + s * _SEG)
            buckets.append(occupied)
            first.append(first[-1] + occupied.size)
        self.keys = np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64)
        self.buckets = np.concatenate(buckets).astype(np.int64) if buckets else self.keys.copy()
        self.first = np.asarray(first, dtype=np.int64)
        #: tensor -> (its distinct magnitudes' float32 bits, largest first; entries at or above each)
        self.exact: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if magnitude is not None:
            for s, (a, b) in enumerate(itertools.pairwise(self.offsets)):
                limit = (b - a) // EXACT_RATIO
                if limit == 0 or self.first[s + 1] - self.first[s] > limit:
                    continue  # more distinct values than a table may hold: there are as many buckets or more
                values = magnitude[a:b].view(torch.int32).numpy()
                # a sixteenth with too many distinct values rules the tensor out (float32 deltas) at 6% of the cost
                if np.unique(values[:(b - a) // 16]).size > limit:
                    continue
                bits, counts = np.unique(values, return_counts=True)  # NumPy's: 1.6x faster than torch.unique here
                if bits.size <= limit and bits[-1] < _INF_BITS:
                    ends = counts[::-1].cumsum(dtype=np.int32 if b - a < 1 << 31 else np.int64)
                    self.exact[s] = (bits[::-1].copy(), ends)

    @staticmethod
    def table_bound(entries: int) -> int:
        """The most bytes exact tables over ``entries`` task-vector entries may take (tensors under 2**31 entries)."""
        return entries * 8 // EXACT_RATIO

    @property
    def nbytes(self) -> int:
        """Memory the index holds (host and device)."""
        tables = sum(bits.nbytes + ends.nbytes for bits, ends in self.exact.values())
        return self.keys.nbytes + self.buckets.nbytes + self.first.nbytes + self.starts.numel() * 8 + tables

    def trim_(self, magnitude: torch.Tensor, ks: list[int]) -> torch.Tensor:
        """Zero all but the ``ks[s]`` largest entries of each tensor ``s`` of ``magnitude``, in place.

        ``magnitude`` must hold the very values the index was built from. On
        CUDA nothing waits for the device: the bookkeeping is done on the host
        and the kernels are queued.
        """
        high = high_half(magnitude)
        if high.device.type == "cpu":
            high = high.contiguous()  # once for the block: the scans per tensor would each copy their part
        cut = self.cut(lambda a, b: high[a:b], magnitude.__getitem__, ks)
        if cut.trimmed:
            self._zero_below_(magnitude, cut)
        if cut.members.numel():
            magnitude.index_put_((cut.members,), magnitude[cut.members].masked_fill_(cut.dropped, 0.0))
        return magnitude

    def points(self, ks: list[int], high_at: Callable[[int, int], torch.Tensor],
               magnitude_at: Callable[[torch.Tensor], torch.Tensor]) -> tuple[list, dict[int, tuple[float, int]]]:
        """Per tensor ``s``, where to cut it to keep its ``ks[s]`` largest magnitudes (host values).

        Returns ``(points, ties)``. ``points[s]``: ``None`` (kept whole) or
        ``(value, last)``, the k-th largest magnitude and the block position of
        the last entry equal to it that is kept (``Cut.values`` and
        ``Cut.last``; ``(inf, -1)``: nothing kept). Tensors with an exact table
        are looked up there; where entries equal to the cut are dropped, their
        ``last`` is left to the caller: ``ties[s] = (value, j)``, it is the
        j-th entry of tensor ``s`` (from 1, in index order) whose magnitude is
        ``value``. The other tensors are cut as ``cut`` does, with its
        ``high_at`` and ``magnitude_at``.
        """
        points: list[tuple[float, int] | None] = [None] * len(ks)
        ties: dict[int, tuple[float, int]] = {}
        rest = list(self.sizes)  # what the bucket route cuts: a tensor's size keeps it whole there
        for s, (k, n) in enumerate(zip(ks, self.sizes)):
            if k >= n:
                continue
            if k <= 0:
                points[s] = (float("inf"), -1)
            elif s not in self.exact:
                rest[s] = k
            else:
                bits, ends = self.exact[s]
                i = int(np.searchsorted(ends, k))  # the first distinct magnitude reaching the k-th largest
                above = int(ends[i - 1]) if i else 0
                j = k - above  # the cut keeps the first j entries equal to it
                value = float(bits[i:i + 1].view(np.float32)[0])
                if j < ends[i] - above:
                    ties[s] = (value, j)
                else:
                    points[s] = (value, self.offsets[s] + n - 1)
        if rest != self.sizes:
            cut = self.cut(high_at, magnitude_at, rest)
            for s, (value, last) in enumerate(zip(cut.values.tolist(), cut.last.tolist())):
                if rest[s] < self.sizes[s]:
                    points[s] = (value, last)
        return points, ties

    def cut(self, high_at: Callable[[int, int], torch.Tensor], magnitude_at: Callable[[torch.Tensor], torch.Tensor],
            ks: list[int]) -> Cut:
        """Where to cut each tensor ``s`` to keep its ``ks[s]`` largest magnitudes.

        ``high_at(a, b)`` returns the high halves of the block's magnitudes
        (those the index was built from) at positions ``a`` to ``b``, and
        ``magnitude_at(positions)`` those magnitudes (float32) at the given
        block positions; only the tensors with a cut and the entries of each
        cut's bucket are read. Nothing waits for a CUDA device.
        """
        sizes = self.sizes
        device = self.starts.device
        # per tensor, entries below its value are zeroed: -inf keeps a tensor whole, +inf drops it (k = 0)
        value_of = [float("inf") if k <= 0 < n else float("-inf") for k, n in zip(ks, sizes)]
        emptied = tuple(s for s, v in enumerate(value_of) if v > 0)
        need = [s for s, (k, n) in enumerate(zip(ks, sizes)) if 0 < k < n]
        values = _on(value_of, torch.float32, device)
        last = torch.full((len(sizes),), -1, dtype=torch.int64, device=device)
        if not need:
            none = torch.zeros(0, dtype=torch.int64, device=device)
            return Cut(values, last, emptied, none, none.bool())
        segs = np.asarray(need, dtype=np.int64)
        k = np.asarray([ks[s] for s in need], dtype=np.int64)
        # the bucket holding each tensor's k-th largest, the entries above it and in it
        pos = np.searchsorted(self.keys, segs * _SEG + k)
        bucket = self.buckets[pos]
        above = np.where(pos > self.first[segs], self.keys[pos - 1] - segs * _SEG, 0)
        count = self.keys[pos] - segs * _SEG - above
        members = self._members(high_at, need, bucket.tolist(), count.tolist())
        seg_of = torch.searchsorted(self.starts, members, right=True) - 1
        found = magnitude_at(members)
        low = found.view(torch.int32) & 0xFFFF
        # within a tensor: largest first; stable, so equal values stay in index order. int32 keys
        # where they fit (under 2**15 tensors in the block) halve the radix sort's passes on CUDA
        key_dtype = torch.int32 if len(sizes) < 1 << 15 else torch.int64
        order_key, perm = torch.sort((seg_of * (1 << 16) + (0xFFFF - low)).to(key_dtype), stable=True)
        members = members[perm]
        # sorted position of each tensor's k-th largest: its members follow those of earlier tensors
        p = _on((np.cumsum(count) - count + (k - above) - 1).tolist(), torch.int64, device)
        segs_t = _on(need, torch.int64, device)
        cut_key = order_key[p]
        values[segs_t] = found[perm[p]]
        last[segs_t] = members[p]
        # entries equal to the cut beyond the k kept: later in sorted order, with the cut's key
        last_kept = torch.full((len(sizes),), members.numel(), dtype=torch.int64, device=device)
        last_kept[segs_t] = p
        cut_of = torch.full((len(sizes),), -1, dtype=key_dtype, device=device)
        cut_of[segs_t] = cut_key
        seg_sorted = (order_key >> 16).long()
        j = torch.arange(members.numel(), device=device)
        dropped = (j > last_kept[seg_sorted]) & (order_key == cut_of[seg_sorted])
        return Cut(values, last, emptied, members, dropped)

    def _members(self, high_at: Callable[[int, int], torch.Tensor], need: list[int], bucket: list[int],
                 count: list[int]) -> torch.Tensor:
        """Ascending indices of the entries of each tensor ``need[q]`` whose high half is ``bucket[q]``.

        On a CPU one NumPy scan per tensor; on CUDA one compare over the block
        against per-entry targets, gathered with the total count known up front
        (``nonzero_static``: no host sync).
        """
        offsets = self.offsets
        if self.starts.device.type == "cpu":
            # contiguous: strided compares run at half the speed
            parts = [np.flatnonzero(high_at(offsets[s], offsets[s + 1]).contiguous().numpy() == v) + offsets[s]
                     for s, v in zip(need, bucket)]
            return torch.from_numpy(np.concatenate(parts))
        target = [-1] * len(self.sizes)  # -1 matches nothing
        for s, v in zip(need, bucket):
            target[s] = v
        high = high_at(0, offsets[-1])
        per_entry = expand(target, self.sizes, dtype=torch.int16, device=high.device)
        return torch.nonzero_static(high == per_entry, size=sum(count)).squeeze(1)

    def _zero_below_(self, magnitude: torch.Tensor, cut: Cut) -> None:
        """Zero each tensor's entries below its cut value (-inf: none), and all of those cut to nothing.

        One masked fill on CUDA; a threshold per tensor on a CPU, where a masked
        fill over a block is ~15x slower. Both keep NaN entries (which only a
        broken source produces; the candidate then fails its finiteness check)
        unless the whole tensor is dropped, as export's ``RankCut`` does.
        """
        # the float32 just below each value: what the threshold (keeping x > bound) keeps is x >= value
        bounds = torch.nextafter(cut.values, torch.full_like(cut.values, float("-inf")))
        if magnitude.device.type != "cpu":
            per_entry = expand(bounds.unbind(), self.sizes, dtype=bounds.dtype, device=bounds.device)
            magnitude.masked_fill_(magnitude <= per_entry, 0.0)
            for s in cut.emptied:
                magnitude[self.offsets[s]:self.offsets[s + 1]].zero_()
            return
        for a, b, value, bound in zip(self.offsets, self.offsets[1:], cut.values.tolist(), bounds.tolist()):
            if value == float("inf"):
                magnitude[a:b].zero_()
            elif value > float("-inf"):
                torch.nn.functional.threshold(magnitude[a:b], bound, 0.0, inplace=True)


def _on(values: list, dtype: torch.dtype, device) -> torch.Tensor:
    """A small host list as a device tensor, copied without waiting for the device (pinned, non-blocking)."""
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t
