"""The run directory: frozen config, append-only journal, optimizer state, best model.

::

    runs/NAME/
      config.yaml      the resolved search space (absolute paths) + CLI overrides, frozen at start
      journal.jsonl    one line per finished evaluation (the run's history; never rewritten)
      optimizer/       optimizer state, replaced atomically after every ask and tell (+ Optuna storage),
                       and space.json: the search as started (what resume may not change)
      best/            the exported best model
      .lock            held (flock) by the one process searching in it

One writer persists everything: the journal is appended and fsynced line by
line; state files are replaced with ``os.replace``. A ``kill -9`` can at worst
leave a torn last journal line (the evaluation in progress), which resume drops
and re-runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.fsutil import check_writable_parent, named, write_bytes_atomic
from evomerge.spaces.space import SearchSpace

log = logging.getLogger(__name__)

CONFIG = "config.yaml"
JOURNAL = "journal.jsonl"
OPTIMIZER = "optimizer"
BEST = "best"
LOCK = ".lock"
FROZEN = "space.json"
STATUSES = ("ok", "failed", "oom")


@dataclass
class Evaluation:
    """One finished evaluation, as journaled."""

    id: int
    genes: dict[str, float]
    x: list[float]
    recipe: dict[str, Any]
    metrics: dict[str, float]
    fitness: list[float] | None
    status: str
    error: str | None = None
    worker: int | None = None
    seconds: float = 0.0
    attempts: int = 1
    #: the surrogate score, when the space screens candidates (see evomerge.run.screening)
    surrogate: float | None = None
    #: True when the candidate was not fully evaluated and ``fitness`` is the estimate it was told
    screened: bool = False
    #: unix times at which the worker began and finished the journaled work (the full evaluation, or the
    #: surrogate probe of a screened candidate); None in journals written before they were recorded
    started: float | None = None
    finished: float | None = None
    #: which session of the run journaled it (1: the search, +1 per resume), so views can leave out the
    #: pauses between sessions; None in journals written before it was recorded
    session: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=False)


class RunDir:
    """A run directory on disk; see the module doc."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # -- lifecycle -----------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, space: SearchSpace) -> RunDir:
        """Start a new run directory; refuses one that already holds a run or other files."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise EvomergeError(f"{path}: is a file, not a directory; choose another --run-dir")
        if path.exists() and any(path.iterdir()):
            hint = f"continue it with `evomerge resume {path}`" if (path / CONFIG).is_file() else "it is not a run"
            raise EvomergeError(f"{path}: already exists ({hint}); choose another --run-dir")
        check_writable_parent(path)
        (path / OPTIMIZER).mkdir(parents=True, exist_ok=True)
        run = cls(path)
        run.save_space(space)
        write_bytes_atomic(path / OPTIMIZER / FROZEN, json.dumps(_identity(space)).encode())
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """An existing run directory (for resume, status, export)."""
        path = Path(path)
        if not path.exists():
            raise EvomergeError(f"{path}: no such run directory")
        if not (path / CONFIG).is_file():
            raise EvomergeError(f"{path}: not a run directory (no {CONFIG}); start one with `evomerge search`")
        return cls(path)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run for this process: a second search or resume of it is refused meanwhile.

        Two writers would journal the same evaluation ids twice and leave a run
        no resume can continue. The lock is the kernel's (``flock``), so a
        killed process never leaves it stale.
        """
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            os.close(fd)
            raise EvomergeError(f"{self.path}: another evomerge process is searching in this run; "
                                "wait for it to finish or stop it, then resume") from None
        try:
            yield
        finally:
            os.close(fd)

    @property
    def busy(self) -> bool:
        """Whether a process is searching in this run now (holds ``lock``); looks without creating anything."""
        try:
            fd = os.open(self.path / LOCK, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            return not _try_lock(fd)  # taken only for this look: closing the file releases it
        finally:
            os.close(fd)

    @property
    def started(self) -> bool:
        """Whether any evaluation of this run (or of its stages) has been journaled."""
        return any(self.path.rglob(JOURNAL))

    # -- config --------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    def space(self) -> SearchSpace:
        """The frozen, resolved search space of this run.

        Refused when ``config.yaml`` was edited since the run started in
        anything but its budget or workers: candidates of another genome,
        method or objective would be told to this optimizer, and status,
        report and export would rank this run's results by another objective.
        """
        space = SearchSpace.from_file(self.config_file)
        frozen = self.optimizer_dir / FROZEN
        if not frozen.is_file():
            return space  # a run started before the file existed
        try:
            started = json.loads(frozen.read_text())
        except (OSError, ValueError) as exc:
            raise EvomergeError(f"{frozen}: damaged ({exc}); it records the search as started, so that an edited "
                                f"{CONFIG} can be refused. Restore it, or delete it to go on without that check")
        key = _first_difference(started, _identity(space))
        if key is not None:
            raise EvomergeError(f"{self.config_file}: {key} was changed after the run started; a run's results "
                                "come from one search (only budget and workers may change): undo the edit, or "
                                "start a new run with the edited space")
        return space

    def check_unchanged(self) -> None:
        """Refuse a ``config.yaml`` edited since the run started (see ``space``), or whose budget is below
        the evaluations done."""
        space = self.space()
        done = sum(1 for e in self.journal() if not e.screened)
        if space.budget < done:
            raise EvomergeError(f"{self.config_file}: budget {space.budget} is below the {done} evaluations this run "
                                "has done; a budget can only grow")

    def save_space(self, space: SearchSpace) -> None:
        """Freeze ``space`` (atomically; resume with a larger budget rewrites only ``budget``)."""
        write_bytes_atomic(self.config_file, space.to_yaml().encode())

    @property
    def optimizer_dir(self) -> Path:
        return self.path / OPTIMIZER

    @property
    def best_dir(self) -> Path:
        return self.path / BEST

    # -- journal -------------------------------------------------------------
    @property
    def journal_file(self) -> Path:
        return self.path / JOURNAL

    def append(self, evaluation: Evaluation) -> None:
        """Append one evaluation durably (flushed and fsynced before returning)."""
        with named(self.journal_file), open(self.journal_file, "a") as f:
            f.write(evaluation.to_json() + "\n")
            f.flush()
            os.fsync(f.fileno())

    def journal(self, *, repair: bool = False) -> list[Evaluation]:
        """Every journaled evaluation, in order.

        A torn last line (the process died mid-write) is dropped with a warning,
        and with ``repair`` cut from the file so appends stay line-aligned. A
        broken line anywhere else is an error naming the line, and so is a
        line repeating a candidate's id (two journals joined): history is never
        silently discarded or counted twice.
        """
        data = self._journal_bytes()
        lines = data.split(b"\n")
        # Lines are written whole with their newline, so a last piece without one is torn.
        torn = lines.pop() if lines else b""
        out: list[Evaluation] = []
        for _, evaluation, why in self._entries(lines):
            if why is not None:
                raise EvomergeError(f"{self.journal_file}: {why}")
            out.append(evaluation)
        if torn.strip():
            log.warning("%s: dropping a torn last line (%d bytes); its evaluation will be re-run",
                        self.journal_file, len(torn))
            if repair:
                with open(self.journal_file, "r+b") as f:
                    f.truncate(len(data) - len(torn))
        return out

    def _journal_bytes(self) -> bytes:
        """The journal's bytes (none before the first evaluation), or an error naming what is in its place."""
        try:
            return self.journal_file.read_bytes()
        except FileNotFoundError:
            return b""
        except OSError as exc:
            raise EvomergeError(f"{self.journal_file}: cannot read the journal ({exc.strerror})") from None

    def readable_journal(self) -> tuple[list[Evaluation], list[int]]:
        """Every parseable evaluation and the numbers of the lines that are not (for views, never for resume).

        Status, report and export must work on a journal that is being written
        (its last line may be half-written) or was damaged; they show what is
        readable and say how many lines they skipped, instead of refusing. A
        line repeating an earlier candidate's id is skipped too.
        """
        out: list[Evaluation] = []
        bad: list[int] = []
        for number, evaluation, why in self._entries(self._journal_bytes().splitlines()):
            if why is None:
                out.append(evaluation)
            else:
                bad.append(number)
        return out, bad

    def _entries(self, lines: list[bytes]) -> Iterator[tuple[int, Evaluation | None, str | None]]:
        """Per non-blank journal line: its number, its evaluation, and why it is unreadable (None when it is
        readable): it does not parse, or it repeats an earlier line's candidate id."""
        objectives = self._objectives
        seen: dict[int, int] = {}
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                evaluation = parse_evaluation(raw, objectives)
            except (ValueError, TypeError) as exc:
                yield number, None, (f"line {number} is corrupt ({exc}); fix or delete that line, then resume "
                                     "again (its evaluation will be re-run)")
                continue
            if evaluation.id in seen:
                yield number, None, (f"line {number} repeats candidate #{evaluation.id} of line {seen[evaluation.id]}; "
                                     "a run journals each candidate once (were two journals joined?). Delete the "
                                     "repeated lines, then resume again")
                continue
            seen[evaluation.id] = number
            yield number, evaluation, None

    @functools.cached_property
    def _objectives(self) -> int:
        """How many objectives the run's fitness vectors hold (fixed for a run: ``space`` refuses edits)."""
        return len(self.space().objective.directions)


def parse_evaluation(raw: bytes | str, objectives: int | None = None) -> Evaluation:
    """One journal line as an ``Evaluation``; ValueError or TypeError when it is not one (or, given
    ``objectives``, when its fitness has another length)."""
    evaluation = Evaluation(**json.loads(raw))
    if evaluation.status not in STATUSES:
        raise ValueError(f"unknown status {evaluation.status!r}")
    e = evaluation
    shaped = (isinstance(e.genes, dict) and isinstance(e.metrics, dict) and isinstance(e.x, list)
              and isinstance(e.fitness, (list, type(None))) and isinstance(e.recipe, dict)
              and _is_int(e.id) and _is_int(e.attempts) and (e.session is None or _is_int(e.session)))
    numbers = [*e.genes.values(), *e.x, *e.metrics.values(), *(e.fitness or []), e.seconds,
               *(v for v in (e.surrogate, e.started, e.finished) if v is not None)] if shaped else []
    if not shaped or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
        raise ValueError("a field holds a value of the wrong type")
    if e.fitness is not None and not all(math.isfinite(v) for v in e.fitness):
        raise ValueError(f"non-finite fitness {e.fitness}")
    if e.fitness is not None and objectives is not None and len(e.fitness) != objectives:
        raise ValueError(f"{len(e.fitness)} fitness values for {objectives} objectives")
    return evaluation


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _identity(space: SearchSpace) -> dict:
    """What makes a search this search: the space without the settings a resume may change."""
    data = space.model_dump(mode="json")
    for key in ("budget", "workers"):
        data.pop(key, None)
    return data


def _first_difference(old: Any, new: Any, path: str = "") -> str | None:
    """The dotted key where ``new`` first differs from ``old`` (None when equal)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(k for k in new if k not in old)]:
            found = _first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
        return None
    return None if old == new else (path or "the space")


def _try_lock(fd: int) -> bool:
    """Take the exclusive ``flock`` on ``fd`` unless another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
