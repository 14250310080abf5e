"""Stream tensors into HF-style sharded safetensors files.

Every output tensor's name, shape and dtype is known from the merge plan before
any weight is computed, so the shard layout and headers are fixed up front and
each merged tensor is written straight to its offset (``os.pwrite``, which
releases the GIL) the moment it is ready. Memory holds only the tensors in
flight, never a whole shard.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from evomerge.errors import EvomergeError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
              "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
             "int16": 2, "int8": 1, "uint8": 1, "bool": 1}
INDEX = "model.safetensors.index.json"


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> bytes (decimal units as in transformers; KiB/MiB/GiB binary)."""
    if isinstance(text, int):
        size = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
        if not m or m.group(2).upper() not in _UNITS:
            raise EvomergeError(f"invalid size {text!r}; use e.g. 500MB or 5GB")
        size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size < 1:
        raise EvomergeError(f"invalid size {text!r}: a shard holds at least one byte; use e.g. 500MB or 5GB")
    return size


@dataclass(frozen=True)
class TensorSlot:
    """Where one output tensor goes."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * _ITEMSIZE[self.dtype]


class StreamingShardWriter:
    """Pre-laid-out safetensors shards that tensors are written into as they arrive.

    ``slots`` fixes the order, shapes and dtypes; shards are cut at
    ``max_shard_bytes``. ``write`` is thread-safe (positional writes to
    disjoint ranges). ``close`` checks every slot was written and writes the index.
    """

    def __init__(self, out_dir: Path, slots: Sequence[TensorSlot], max_shard_bytes: int) -> None:
        self.out_dir = Path(out_dir)
        groups: list[list[TensorSlot]] = [[]]
        size = 0
        for slot in slots:
            if groups[-1] and size + slot.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(slot)
            size += slot.nbytes
        n = len(groups)
        self.files = ["model.safetensors"] if n == 1 else [
            f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)
        ]
        self._where: dict[str, tuple[int, int, int]] = {}  # name -> (fd, offset, nbytes)
        self.weight_map: dict[str, str] = {}  # name -> shard file
        self._fds: list[int] = []
        self._pending = {s.name for s in slots}
        self._lock = threading.Lock()
        self.total_bytes = sum(s.nbytes for s in slots)
        for file, group in zip(self.files, groups):
            self._open_shard(self.out_dir / file, group)

    def _open_shard(self, path: Path, group: list[TensorSlot]) -> None:
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for slot in group:
            header[slot.name] = {
                "dtype": _ST_DTYPES[slot.dtype],
                "shape": list(slot.shape),
                "data_offsets": [offset, offset + slot.nbytes],
            }
            offset += slot.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._fds.append(fd)
        os.pwrite(fd, len(blob).to_bytes(8, "little") + blob, 0)
        start = 8 + len(blob)
        os.ftruncate(fd, start + offset)
        for slot in group:
            begin = header[slot.name]["data_offsets"][0]
            self._where[slot.name] = (fd, start + begin, slot.nbytes)
            self.weight_map[slot.name] = path.name

    def write(self, name: str, tensor) -> None:
        """Write ``tensor`` (already in its slot's dtype and shape) to its place."""
        fd, offset, nbytes = self._where[name]
        import torch

        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes != nbytes:
            raise EvomergeError(f"tensor {name!r}: {data.nbytes} bytes, slot expects {nbytes}")
        view = memoryview(data)
        try:
            while view.nbytes:
                written = os.pwrite(fd, view, offset)
                view = view[written:]
                offset += written
        except OSError as exc:  # a full disk, typically: the shards are sparse until written
            raise EvomergeError(f"{self.out_dir / self.weight_map[name]}: cannot write {name} ({exc.strerror})") from None
        with self._lock:
            self._pending.discard(name)

    def close(self, metadata: dict | None = None) -> list[str]:
        """Close the shards and write the index when sharded; returns the file names."""
        if self._pending:
            raise EvomergeError(f"merge incomplete: {len(self._pending)} tensors never written, e.g. {min(self._pending)!r}")
        # No fsync: the shards live in a temp directory that is renamed only when
        # complete, which already protects against a crash mid-write.
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_bytes, **(metadata or {})}, "weight_map": self.weight_map}
            (self.out_dir / INDEX).write_text(json.dumps(index, indent=2))
        return self.files

    def abort(self) -> None:
        """Close file descriptors without checks (the caller discards the directory)."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []
