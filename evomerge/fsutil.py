"""Crash-safe file system writes: build in a temp path, rename at the end."""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError

log = logging.getLogger(__name__)


def check_writable_parent(path: Path) -> None:
    """Raise a clear error when the directory that would hold ``path`` cannot be written."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise EvomergeError(f"{path}: cannot create it, {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EvomergeError(f"{path}: cannot write under {parent} (permission denied)")


def check_replaceable(out: Path, inputs: Iterable[Path] = ()) -> None:
    """Refuse to replace ``out`` (``--force``) unless it is a model directory, or empty, holding no input.

    ``--force`` swaps a whole directory: pointed by mistake at a folder of
    runs, at a source model or at the directory holding the config, it would
    delete them. A model directory has a ``config.json``.
    """
    out = Path(out)
    if not out.is_dir():
        raise EvomergeError(f"{out}: exists and is not a directory; refusing to replace it")
    where = out.resolve()
    for path in inputs:
        resolved = Path(path).resolve()
        if resolved == where or where in resolved.parents:
            raise EvomergeError(f"{out}: holds {path}, an input of this command; refusing to replace it")
    if not (out / "config.json").is_file() and any(out.iterdir()):
        raise EvomergeError(f"{out}: exists and is not a model directory (no config.json); refusing to replace it")


@contextlib.contextmanager
def atomic_dir(final: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temp directory next to ``final`` and rename it to ``final`` on success.

    On any exception the temp directory is removed and ``final`` is untouched, so a
    crash never leaves a half-written output. With ``replace`` an existing ``final``
    is swapped out only after the new one is complete.
    """
    final = Path(final)
    check_writable_parent(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.tmp-"
    remove_abandoned(final.parent, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=final.parent))
    # mkdtemp makes the directory private (0700); the output should get the
    # permissions of any directory the user creates.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        if final.exists():
            if not replace:
                # it appeared while this output was being made (another process writing there)
                raise EvomergeError(f"{final}: was created by something else while this output was being "
                                    "written; nothing was replaced. Pass --force to replace it")
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_abandoned(parent: Path, prefix: str) -> None:
    """Delete the temp directories ``prefix<pid>-*`` under ``parent`` whose process is gone.

    A process killed mid-write (``kill -9``, OOM) cannot clean up, and the
    temp copy of a 7B model is ~15 GB. A directory whose process still runs,
    or whose name carries no pid, is left alone.
    """
    for path in parent.glob(f"{glob.escape(prefix)}*"):
        pid = path.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            log.warning("removing %s, left by a process that was stopped while writing it", path)
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def read_json(file: Path, missing: str) -> Any:
    """Parse a JSON file; a missing file raises ``missing``, bad JSON names the file and line."""
    try:
        return json.loads(Path(file).read_text())
    except FileNotFoundError:
        raise EvomergeError(missing) from None
    except json.JSONDecodeError as exc:
        raise EvomergeError(f"{file}: invalid JSON ({exc.msg} at line {exc.lineno})") from None


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` via a temp file and ``os.replace``."""
    write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a synced temp file and ``os.replace``.

    A crash at any point leaves either the old file or the new one, never a torn
    mix, which is what resumable state (optimizer checkpoints) relies on.
    """
    path = Path(path)
    with named(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


@contextlib.contextmanager
def named(path: Path) -> Iterator[None]:
    """Give an OSError raised inside without a file name (a full disk on write or fsync) ``path`` as its name."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
