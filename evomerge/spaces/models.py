"""The models a search space names, resolved to directories and checked to be mergeable."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from evomerge.errors import EvomergeError, prefixed
from evomerge.io.model_dir import ModelDir
from evomerge.zoo.registry import ZOO_PREFIX, resolve_zoo_ref


def resolve_ref(ref: str, *, relative_to: Path | None = None, progress=None, key: str | None = None) -> str:
    """Absolute path for a model, directory or file reference (``zoo:…`` or a path); errors name ``key``."""
    with prefixed(key):
        if ref.startswith(ZOO_PREFIX):
            return str(resolve_zoo_ref(ref, progress=progress))
        path = Path(ref).expanduser()
        if not path.is_absolute() and not path.exists() and relative_to is not None and (relative_to / path).exists():
            path = relative_to / path
        if not path.exists():
            raise EvomergeError(f"{ref!r}: no such file or directory")
        return str(path.resolve())


@dataclass(frozen=True)
class PoolModel:
    """A model of the pool: its path, a short label for gene names, its header."""

    path: str
    label: str
    dir: ModelDir

    @property
    def num_layers(self) -> int:
        return self.dir.num_layers


def open_pool(base: str, sources: list[str]) -> tuple[PoolModel, list[PoolModel]]:
    """Open base and sources; all must share architecture, width and vocabulary."""
    labels: list[str] = []
    names = [Path(p).name or "model" for p in (base, *sources)]

    def label_for(path: str) -> str:
        # a directory name seen before gets a number, one that no other model is called (org1/m, org2/m, x/m3)
        name = Path(path).name or "model"
        label, k = name, len(labels)
        while label in labels or (label != name and label in names):
            label, k = f"{name}{k}", k + 1
        labels.append(label)
        return label

    base_model = PoolModel(base, label_for(base), ModelDir(base))
    pool = [PoolModel(p, label_for(p), ModelDir(p)) for p in sources]
    keys = ("model_type", "hidden_size", "vocab_size")
    want = {k: base_model.dir.config.get(k) for k in keys}
    for m in pool:
        got = {k: m.dir.config.get(k) for k in keys}
        if got != want:
            diff = next(k for k in keys if got[k] != want[k])
            raise EvomergeError(
                f"models of different architectures in one space: {m.path} has {diff}={got[diff]!r}, "
                f"the base {base} has {want[diff]!r}"
            )
    return base_model, pool
