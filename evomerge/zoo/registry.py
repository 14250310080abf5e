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
    or a damaged one, missing files it lists (unless ``force``), a zoo with
    files of the user's in it, or any non-empty directory that is not a zoo
    (always: ``force`` replaces what a build made, never a user's files). An
    empty directory is removed so the build can rename its temp dir into place.
    """
    if out.exists() and not out.is_dir():
        raise EvomergeError(f"{out}: exists and is not a directory")
    if not out.exists():
        return None
    if (out / MANIFEST).exists():
        manifest = read_manifest(out)
        files = manifest.get("files") if isinstance(manifest.get("files"), list) else []
        missing = [f for f in files if not (out / str(f)).is_file()]
        if manifest.get("fingerprint") == fingerprint and not missing:
            return load_zoo(out)
        if missing and not force:
            raise EvomergeError(f"{out}: the zoo is damaged ({missing[0]} is missing); rebuild it with --force")
        if not force:
            raise EvomergeError(
                f"{out}: holds a different zoo ({manifest.get('kind')} {manifest.get('size')}, "
                f"seed {manifest.get('seed')}); pass --force to replace it or choose another --out"
            )
        extra = _foreign_files(out, manifest)
        if extra:
            raise EvomergeError(
                f"{out}: holds files that are not part of the zoo ({', '.join(extra[:3])}"
                f"{', ...' if len(extra) > 3 else ''}); --force would delete them: move them or choose another --out"
            )
        return None
    if any(out.iterdir()):
        raise EvomergeError(f"{out}: directory is not empty and is not an evomerge zoo; choose another --out")
    shutil.rmtree(out)
    return None


def _foreign_files(out: Path, manifest: dict) -> list[str]:
    """Files under zoo directory ``out`` that its build did not write (relative paths, sorted).

    The manifest lists what the build wrote (``files``); a zoo built before it
    did is checked at the top level only (its model and task directories).
    """
    if isinstance(manifest.get("files"), list):
        built = {MANIFEST, *map(str, manifest["files"])}
        return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                      if p.is_file() and str(p.relative_to(out)) not in built)
    models = manifest.get("models") if isinstance(manifest.get("models"), dict) else {}
    tops = {MANIFEST, str(manifest.get("tasks_dir", "")), *(Path(str(r)).parts[0] for r in models.values() if r)}
    return sorted(p.name for p in out.iterdir() if p.name not in tops)


#: Prefix of model references that name a member of the embedded zoo, e.g. ``zoo:lm/small/shift``.
ZOO_PREFIX = "zoo:"


def resolve_zoo_ref(ref: str, *, seed: int = 0, progress=None) -> Path:
    """Path of ``zoo:KIND/SIZE/MEMBER``, building the zoo into the cache on first use.

    MEMBER is a model of the zoo (``base`` or a fine-tune task name) or ``tasks``
    (the lm-eval task directory, for an evaluator's ``include_path``); a path
    may follow it to name a file inside, e.g. ``zoo:lm/small/tasks/unlabeled.jsonl``.
    """
    parts = ref[len(ZOO_PREFIX):].strip("/").split("/")
    if len(parts) < 3 or not all(parts):
        raise EvomergeError(f"{ref!r}: a zoo reference is zoo:KIND/SIZE/MEMBER, e.g. zoo:lm/small/shift")
    (kind, size, member), inside = parts[:3], parts[3:]
    from evomerge.zoo import ZOO_KINDS, build_zoo

    if kind not in ZOO_KINDS or size not in ZOO_KINDS[kind]:
        known = ", ".join(f"{k}/{s}" for k, sizes in ZOO_KINDS.items() for s in sizes)
        raise EvomergeError(f"{ref!r}: unknown zoo {kind}/{size}; known: {known}")
    path = default_zoo_dir(kind, size, seed)
    info = build_zoo(kind, size, path, seed=seed, progress=progress)  # reuses an identical zoo at once
    if member == "tasks":
        found = info.tasks_dir
    elif member in info.models:
        found = info.models[member]
    else:
        raise EvomergeError(f"{ref!r}: the {kind}/{size} zoo has no model {member!r}; it has {', '.join(info.models)}")
    found = found.joinpath(*inside)
    if not found.exists():
        raise EvomergeError(f"{ref!r}: no {'/'.join(inside)} in {found.parent}")
    return found
