"""Read HF model directories lazily: headers first, tensors memory-mapped on demand.

Shapes and dtypes come from the safetensors headers alone, so a whole merge can
be planned and validated (missing tensors, shape mismatches, truncated files)
before a single weight is read or anything is written.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from evomerge.arch import ArchMap, arch_for
from evomerge.errors import EvomergeError
from evomerge.fsutil import read_json

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"

_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


@dataclass(frozen=True)
class TensorInfo:
    """Header facts of one stored tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    file: str
    offset: int = 0  # absolute byte offset of the data in the file
    nbytes: int = 0


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check that the file holds all the bytes it announces."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as exc:
        raise EvomergeError(f"{path}: not a readable safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise EvomergeError(f"{path}: not a readable safetensors file (its header is not a JSON object)")
    out: dict[str, TensorInfo] = {}
    end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = meta["data_offsets"]
            dtype = _DTYPES[meta["dtype"]]
            shape = tuple(int(d) for d in meta["shape"])
        except (KeyError, TypeError, ValueError):
            raise EvomergeError(f"{path}: corrupt header entry for tensor {name!r}") from None
        end = max(end, stop)
        out[name] = TensorInfo(name, shape, dtype, path.name, 8 + n + begin, stop - begin)
    if 8 + n + end > size:
        raise EvomergeError(f"{path}: truncated ({size} bytes, header promises {8 + n + end})")
    return out


class ModelDir:
    """A Hugging Face model directory, opened lazily.

    Reads ``config.json`` and the safetensors headers up front; each tensor is
    read on demand with one positional read into its own buffer (no memory
    map), so resident memory holds only the tensors in use and reads from
    several threads run in parallel. Pickle checkpoints (``*.bin``) can execute
    code when loaded, so they are refused unless ``allow_pickle`` is set.
    """

    def __init__(self, path: str | Path, *, allow_pickle: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise EvomergeError(
                f"{path}: model directory not found (evomerge reads local HF directories; it does not download)"
            )
        self.config = self._read_config()
        self._pickle = False
        self.infos = self._read_index(allow_pickle)
        self.arch: ArchMap = arch_for(self.config, list(self.infos))
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _read_config(self) -> dict:
        config = read_json(self.path / "config.json", f"{self.path}: no config.json (not a Hugging Face model directory)")
        if not isinstance(config, dict):
            raise EvomergeError(f"{self.path / 'config.json'}: not a model config (a JSON object)")
        return config

    def _read_index(self, allow_pickle: bool) -> dict[str, TensorInfo]:
        index = self.path / SAFETENSORS_INDEX
        if index.exists():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError):
                raise EvomergeError(f"{index}: invalid safetensors index (no weight_map of tensor -> file)") from None
            infos: dict[str, TensorInfo] = {}
            for file in sorted(set(weight_map.values())):
                if not (self.path / file).exists():
                    raise EvomergeError(f"{self.path / file}: shard named in {SAFETENSORS_INDEX} is missing")
                infos.update(read_safetensors_header(self.path / file))
            missing = sorted(set(weight_map) - set(infos))
            if missing:
                raise EvomergeError(f"{index}: tensor {missing[0]!r} is not in its shard {weight_map[missing[0]]}")
            return {name: infos[name] for name in weight_map}
        files = sorted(self.path.glob("*.safetensors"))
        if files:
            infos = {}
            for file in files:
                infos.update(read_safetensors_header(file))
            return infos
        pickles = sorted(self.path.glob("*.bin"))
        if pickles:
            if not allow_pickle:
                raise EvomergeError(
                    f"{self.path}: only pickle checkpoints (*.bin) found; loading them can run arbitrary code. "
                    "Convert to safetensors, or pass --allow-pickle if you trust the source"
                )
            return self._read_pickles(pickles)
        raise EvomergeError(f"{self.path}: no *.safetensors weights found")

    def _read_pickles(self, files: list[Path]) -> dict[str, TensorInfo]:
        import torch

        self._pickle = True
        self._pickled: dict[str, object] = {}
        infos = {}
        for file in files:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # noqa: BLE001 -- torch.load raises many kinds for a damaged file
                raise EvomergeError(f"{file}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
            for name, t in state.items():
                self._pickled[name] = t
                infos[name] = TensorInfo(name, tuple(t.shape), str(t.dtype).removeprefix("torch."), file.name)
        return infos

    # -- queries -----------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """All tensor names, in storage order."""
        return list(self.infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            raise EvomergeError(f"{self.path}: missing tensor {name!r}") from None

    @functools.cached_property
    def layer_config(self) -> dict:
        """``config`` plus the per-layer lists its transformers config class derives when config.json omits
        them (Qwen2's ``layer_types`` from ``use_sliding_window`` and ``max_window_layers``, say): a stack
        of this model's layers keeps each layer's own attention type only if the output lists it."""
        from transformers import AutoConfig

        try:
            derived = AutoConfig.from_pretrained(self.path).to_dict()
            derived[self.arch.num_layers_key] = self.num_layers
            extra = {k: derived[k] for k in self.arch.per_layer_keys(derived) if k not in self.config}
        except Exception:  # noqa: BLE001 -- a family transformers does not know: config.json is all there is
            extra = {}
        return {**self.config, **extra}

    @property
    def num_layers(self) -> int:
        try:
            return self.arch.num_layers(self.config)
        except EvomergeError as exc:
            raise EvomergeError(f"{self.path}/{exc}") from None

    def tensor(self, name: str):
        """Read one tensor into fresh CPU memory (the caller may modify it)."""
        import torch

        info = self.info(name)
        if self._pickle:
            return self._pickled[name].clone()  # the loaded state is memory-mapped and shared
        out = torch.empty(info.shape, dtype=getattr(torch, info.dtype))
        return self.read_into(name, out)

    def read_into(self, name: str, out):
        """Read tensor ``name`` into the contiguous CPU tensor ``out`` (same dtype and size) and return it.

        Positional reads straight into ``out``'s memory: no intermediate buffer.
        """
        import torch

        info = self.info(name)
        if self._pickle:
            return out.view(-1).copy_(self._pickled[name].view(-1)).view(out.shape)
        fd = self._fds.get(info.file)
        if fd is None:
            with self._lock:
                fd = self._fds.get(info.file)
                if fd is None:
                    fd = os.open(self.path / info.file, os.O_RDONLY)
                    self._fds[info.file] = fd
        if not info.nbytes:
            return out
        view, offset = memoryview(out.view(-1).view(torch.uint8).numpy()), info.offset
        while view.nbytes:
            got = os.preadv(fd, [view], offset)
            if got == 0:
                raise EvomergeError(f"{self.path / info.file}: unexpected end of file reading tensor {name!r}")
            view, offset = view[got:], offset + got
        return out

    def close(self) -> None:
        """Close the open shard files."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        if hasattr(self, "_fds"):
            self.close()

    def __repr__(self) -> str:
        return f"ModelDir({str(self.path)!r}, {len(self.infos)} tensors, {self.arch.family})"
