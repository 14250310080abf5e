"""The resident pool: each model's tensors laid end to end in blocks, served from a placement.

A block is a run of consecutive tensors of one dtype, at most ``block_numel``
entries (a larger tensor is a block of its own). Blocks are the unit of the
vectorized task-vector kernels (``evomerge.materialize.blockwise``: one pass
over a block instead of a dozen small operations per tensor) and of streaming
from host memory or disk. Per-tensor access (``tensor(name)``) returns a view
into the block, so layer paths and the per-tensor kernels share the storage.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch

from evomerge.io.model_dir import ModelDir

#: Default block size in entries (16 MB of float32 workspace per model row).
BLOCK_NUMEL = 1 << 22
#: Default block size on CUDA (256 MB of float32 workspace per model row). A block costs a few
#: dozen kernel launches whatever its size; with 4M-entry blocks (and, then, host syncs per block)
#: a 250M-parameter candidate spent 4x longer launching kernels than the H100 spent running them.
CUDA_BLOCK_NUMEL = 1 << 26


def default_block_numel(device: str) -> int:
    """The block size the resident merger uses on ``device`` unless told otherwise."""
    return CUDA_BLOCK_NUMEL if str(device).startswith("cuda") else BLOCK_NUMEL


@dataclass(frozen=True)
class Block:
    """Consecutive tensors of one dtype: names, shapes and sizes in layout order."""

    dtype: str
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    sizes: tuple[int, ...]

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    @functools.cached_property
    def offsets(self) -> tuple[int, ...]:
        """Start of each tensor in the block, plus the end (computed once: candidates use it every time)."""
        return tuple(itertools.accumulate(self.sizes, initial=0))

    @functools.cached_property
    def spans(self) -> tuple[tuple[int, int], ...]:
        """(start, end) of each tensor in the block."""
        return tuple(itertools.pairwise(self.offsets))


def layout(model: ModelDir, block_numel: int = BLOCK_NUMEL) -> tuple[Block, ...]:
    """``model``'s tensors in header order, cut into blocks."""
    blocks: list[Block] = []
    run: list[tuple[str, tuple[int, ...], int]] = []
    dtype, filled = None, 0

    def close() -> None:
        if run:
            blocks.append(Block(dtype, *map(tuple, zip(*run))))
            run.clear()

    for name in model.names:
        info = model.info(name)
        n = math.prod(info.shape)
        if info.dtype != dtype or (run and filled + n > block_numel):
            close()
            dtype, filled = info.dtype, 0
        run.append((name, tuple(info.shape), n))
        filled += n
    close()
    return tuple(blocks)


def model_bytes(model: ModelDir) -> int:
    """Bytes of all of ``model``'s tensors (from the headers)."""
    return sum(model.info(n).nbytes for n in model.names)


class PoolModel:
    """A pool member: a ModelDir whose tensors are served from a placement (see ``placement``)."""

    def __init__(self, source: ModelDir, *, placement: str, device: str, block_numel: int = BLOCK_NUMEL) -> None:
        self.source = source
        self.path = source.path
        self.config = source.config
        self.arch = source.arch
        self.infos = source.infos
        self.names = source.names
        self.num_layers = source.num_layers
        self.placement = placement
        self.device = device
        self.blocks = layout(source, block_numel)
        self._where: dict[str, tuple[int, int, tuple[int, ...]]] = {}
        for b, block in enumerate(self.blocks):
            for name, shape, start in zip(block.names, block.shapes, block.offsets):
                self._where[name] = (b, start, shape)
        self._flat: list[torch.Tensor] | None = None
        if placement != "disk":
            store = device if placement == "device" else "cpu"
            pin = placement == "host" and device.startswith("cuda")
            self._flat = [self._read(block, store, pin) for block in self.blocks]

    def _read(self, block: Block, store: str, pin: bool = False) -> torch.Tensor:
        flat = torch.empty(block.numel, dtype=getattr(torch, block.dtype), pin_memory=pin)
        for name, start, n in zip(block.names, block.offsets, block.sizes):
            self.source.read_into(name, flat[start:start + n])
        return flat.to(store) if store != "cpu" else flat

    def info(self, name: str):
        return self.infos[name]

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name``: a view into its resident block, or read from disk."""
        if self._flat is None:
            return self.source.tensor(name)
        b, start, shape = self._where[name]
        return self._flat[b][start:start + math.prod(shape)].view(shape)

    def block(self, b: int) -> torch.Tensor:
        """Block ``b`` on the device (a transfer or a read unless the placement is ``device``)."""
        if self._flat is None:
            return self._read(self.blocks[b], self.device)
        return self._flat[b].to(self.device, non_blocking=True)  # itself when already there

    @property
    def layer_config(self) -> dict:
        """The source's ``ModelDir.layer_config``."""
        return self.source.layer_config

    @property
    def nbytes(self) -> int:
        """Bytes this member holds in memory (0 on disk)."""
        return 0 if self._flat is None else sum(f.numel() * f.element_size() for f in self._flat)
