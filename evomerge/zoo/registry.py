"""Where zoos live on disk and how a built zoo is recognised and reused."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.fsutil import read_json

MANIFEST = "zoo.json"
#: Environment variable that moves evomerge's cache (zoos live under ``$EVOMERGE_CACHE/zoo``).
CACHE_ENV = "EVOMERGE_CACHE"


def cache_dir() -> Path:
    """evomerge's cache root: ``$EVOMERGE_CACHE`` or ``~/.cache/evomerge``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "evomerge"


def default_zoo_dir(kind: str, size: str, seed: int) -> Path:
    """Default location of a zoo: ``<cache>/zoo/<kind>-<size>-seed<seed>``."""
    return cache_dir() / "zoo" / f"{kind}-{size}-seed{seed}"


@dataclass(frozen=True)
class ZooInfo:
    """A built zoo: its directory and its manifest."""

    path: Path
    manifest: dict

    @property
    def models(self) -> dict[str, Path]:
        """Model name (``base`` and one per fine-tune task) -> HF model directory."""
        return {name: self.path / rel for name, rel in self.manifest["models"].items()}

    @property
    def finetune_tasks(self) -> list[str]:
        return list(self.manifest["finetune_tasks"])

    @property
    def tasks_dir(self) -> Path:
        """Directory to pass to lm-eval as ``--include_path``."""
        return self.path / self.manifest["tasks_dir"]


def read_manifest(path: Path) -> dict:
    """Read ``zoo.json`` from ``path`` with a clear error when it is missing or broken."""
    return read_json(
        Path(path) / MANIFEST, f"{path}: not an evomerge zoo (no {MANIFEST}); build one with `evomerge zoo build`"
    )


def load_zoo(path: Path) -> ZooInfo:
    """Open a built zoo, re-pointing its task YAMLs if the directory was moved."""
    path = Path(path).resolve()
    info = ZooInfo(path, read_manifest(path))
    from evomerge.zoo.lmeval_tasks import ensure_task_paths

    if info.manifest.get("kind") == "lm":
        ensure_task_paths(info.tasks_dir, info.finetune_tasks, info.manifest["spec"]["max_gen_toks"])
    return info


def prepare_zoo_dir(out: Path, fingerprint: str, *, force: bool) -> ZooInfo | None:
    """Decide what to do with ``out`` before a build.

    Returns the zoo already there when it has the same fingerprint (nothing to
    build). Raises when ``out`` holds something else: a zoo of another spec
    (unless ``force``) or any non-empty directory that is not a zoo (always, so a
    user's files are never replaced). An empty directory is removed so the
    build can rename its temp dir into place.
    """
    if out.exists() and not out.is_dir():
        raise EvomergeError(f"{out}: exists and is not a directory")
    if not out.exists():
        return None
    if (out / MANIFEST).exists():
        manifest = read_manifest(out)
        if manifest.get("fingerprint") == fingerprint:
            return load_zoo(out)
        if not force:
            raise EvomergeError(
                f"{out}: holds a different zoo ({manifest.get('kind')} {manifest.get('size')}, "
                f"seed {manifest.get('seed')}); pass --force to replace it or choose another --out"
            )
        return None
    if any(out.iterdir()):
        raise EvomergeError(f"{out}: directory is not empty and is not an evomerge zoo; choose another --out")
    shutil.rmtree(out)
    return None
