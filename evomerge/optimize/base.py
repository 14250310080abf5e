"""The ask/tell optimizer interface and the bookkeeping every backend shares.

The search loop owns evaluation and concurrency; an optimizer only proposes
genomes (``ask``) and learns their scores (``tell``). Genomes live in the unit
box ``[0, 1]^dim``; decoding them into merge parameters happens elsewhere.

What the base class does for every backend, so each backend stays small:

* candidate ids (0, 1, 2, ... in ask order, never reused) and the pending set;
* validation of ``tell`` (unknown or already-told ids, objective count, finiteness);
* the worst successful value per objective, which scores failed candidates;
* one state file, written atomically after every call by the runner's ``save()``,
  from which ``restore()`` continues bit for bit where the run stopped.

Failures are scored rather than dropped: a failed merge or evaluation becomes the
worst value seen so far (or a large finite penalty before any success), so the
optimizer learns to avoid that region instead of seeing a gap.
"""

from __future__ import annotations

import math
import pickle
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.fsutil import write_bytes_atomic

DIRECTIONS = ("maximize", "minimize")

#: Score of a failure before any candidate succeeded, in minimize terms; finite
#: because samplers (TPE's Parzen estimators, pycma's ranking) need numbers.
FAILURE_PENALTY = 1e12

STATE_FILE = "optimizer.pkl"
_STATE_FORMAT = 1


class CorruptStateError(EvomergeError):
    """The saved optimizer state cannot be read (a damaged file, not a configuration mismatch)."""


@dataclass(frozen=True)
class Ask:
    """One proposed candidate: its id and its genome (read-only, float64, in the unit box)."""

    id: int
    x: np.ndarray


class Optimizer(ABC):
    """An ask/tell search over ``[0, 1]^dim`` with exact, crash-safe resume.

    Subclasses implement four hooks: ``_propose`` (the next genome, or None at a
    generation barrier), ``_learn`` (a told result), and ``_get_state`` /
    ``_set_state`` (everything else they need to continue identically).
    """

    #: Registry key, e.g. ``"cmaes"``.
    name: ClassVar[str]
    #: True when ``ask`` never waits for outstanding tells; False for generational backends.
    asynchronous: ClassVar[bool]
    #: Whether more than one objective is supported.
    multi_objective: ClassVar[bool]

    def __init__(
        self,
        *,
        dim: int,
        names: Sequence[str],
        directions: Sequence[str],
        seed: int,
        state_dir: Path,
        settings: dict[str, Any],
        x0: Sequence[float] | None = None,
    ) -> None:
        check_problem(type(self), dim, names, directions)
        #: Where the search starts (the genome's natural starting point), or None for the box centre.
        self.x0 = None if x0 is None else np.clip(np.asarray(x0, dtype=np.float64), 0.0, 1.0)
        if self.x0 is not None and self.x0.shape != (dim,):
            raise EvomergeError(f"optimizer {self.name}: x0 has {self.x0.size} values for {dim} genes")
        self.dim = dim
        self.names = list(names)
        self.directions = list(directions)
        self.seed = int(seed)
        self.state_dir = Path(state_dir)
        self.settings = dict(settings)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._next_id = 0
        self._pending: dict[int, np.ndarray] = {}
        # Worst successful value per objective, in the declared direction (None: no success yet).
        self._worst: list[float | None] = [None] * len(self.directions)

    # -- public interface -------------------------------------------------

    def ask(self) -> Ask | None:
        """The next candidate, or None while a generational backend waits for tells."""
        x = self._propose(self._next_id)
        if x is None:
            return None
        x = np.array(x, dtype=np.float64)
        x.flags.writeable = False  # the pending copy must not change behind our back
        ask = Ask(self._next_id, x)
        self._pending[ask.id] = x
        self._next_id += 1
        return ask

    def tell(self, id: int, values: Sequence[float] | None) -> None:
        """Report a candidate's objective values (declared directions), or None if it failed."""
        if id not in self._pending:
            told = "was already told" if 0 <= id < self._next_id else "was never asked"
            raise EvomergeError(f"optimizer {self.name}: candidate {id} {told}")
        if values is not None:
            values = self._check_values(id, values)
            self._worst = [
                v if w is None else (min(v, w) if d == "maximize" else max(v, w))
                for v, w, d in zip(values, self._worst, self.directions)
            ]
        x = self._pending.pop(id)
        self._learn(id, x, values)

    @property
    def asked(self) -> int:
        """How many candidates were asked (their ids are 0 .. asked - 1)."""
        return self._next_id

    def pending(self) -> dict[int, np.ndarray]:
        """Candidates asked but not yet told, in ask order."""
        return dict(self._pending)

    def save(self) -> None:
        """Write the complete state to ``state_dir`` atomically (the runner calls it after every ask and tell)."""
        state = {
            "format": _STATE_FORMAT,
            "identity": self._identity(),
            "next_id": self._next_id,
            "pending": list(self._pending.items()),
            "worst": self._worst,
            "backend": self._get_state(),
        }
        write_bytes_atomic(self.state_path, pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))

    def restore(self) -> bool:
        """Continue from the state saved in ``state_dir``; False when there is none.

        Call it once, on a freshly constructed optimizer, before the first ask. The
        optimizer is built with the same arguments as the saved one (checked).
        """
        if self._next_id or self._pending:
            raise EvomergeError(f"optimizer {self.name}: restore() must come before the first ask")
        state = self._read_state()
        if state is None:
            self._set_state(None)
            return False
        self._next_id = state["next_id"]
        self._pending = dict(state["pending"])
        self._worst = state["worst"]
        self._set_state(state["backend"])
        return True

    @property
    def state_path(self) -> Path:
        """The file ``save`` writes and ``restore`` reads."""
        return self.state_dir / STATE_FILE

    # -- helpers for backends --------------------------------------------

    def failure_values(self) -> list[float]:
        """What a failed candidate scores now: the worst success per objective, else the penalty."""
        return [
            w if w is not None else (FAILURE_PENALTY if d == "minimize" else -FAILURE_PENALTY)
            for w, d in zip(self._worst, self.directions)
        ]

    # -- backend hooks ----------------------------------------------------

    @abstractmethod
    def _propose(self, id: int) -> np.ndarray | None:
        """The genome for candidate ``id``, or None at a generation barrier."""

    @abstractmethod
    def _learn(self, id: int, x: np.ndarray, values: list[float] | None) -> None:
        """Take in a told result (``values`` None: the candidate failed)."""

    @abstractmethod
    def _get_state(self) -> Any:
        """Picklable backend state; with the base state it must fully determine what comes next."""

    @abstractmethod
    def _set_state(self, state: Any | None) -> None:
        """Adopt a state from ``_get_state`` (None: nothing was saved, clean up leftovers only)."""

    # -- internals --------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        return {
            "optimizer": self.name,
            "dim": self.dim,
            "names": self.names,
            "directions": self.directions,
            "seed": self.seed,
            "settings": self.settings,
        }

    def _read_state(self) -> dict[str, Any] | None:
        try:
            blob = self.state_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            state = pickle.loads(blob)
        except Exception as exc:  # noqa: BLE001  (every unpickling failure means the same to the user)
            raise CorruptStateError(
                f"{self.state_path}: unreadable optimizer state ({type(exc).__name__}: {exc})"
            ) from None
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise CorruptStateError(f"{self.state_path}: not an evomerge optimizer state (format {_STATE_FORMAT})")
        saved, now = state["identity"], self._identity()
        for key in now:
            if saved.get(key) != now[key]:
                raise EvomergeError(
                    f"{self.state_path}: saved with {key}={saved.get(key)!r}, but this run has {key}={now[key]!r}; "
                    "resume with the original configuration or start a new run directory"
                )
        return state

    def _check_values(self, id: int, values: Sequence[float]) -> list[float]:
        try:
            out = [float(v) for v in values]
        except (TypeError, ValueError):
            raise EvomergeError(
                f"optimizer {self.name}: candidate {id}: values must be numbers, got {values!r}"
            ) from None
        if len(out) != len(self.directions):
            raise EvomergeError(
                f"optimizer {self.name}: candidate {id}: got {len(out)} values for {len(self.directions)} objectives"
            )
        if not all(math.isfinite(v) for v in out):
            raise EvomergeError(
                f"optimizer {self.name}: candidate {id}: non-finite value in {out}; tell None for a failed candidate"
            )
        return out


def check_int_setting(optimizer: str, key: str, value: Any, minimum: int) -> None:
    """Raise a clear error unless a setting is an integer >= ``minimum`` (None means the default)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise EvomergeError(f"optimizer {optimizer}: {key} must be an integer >= {minimum}, got {value!r}")


def check_positive_setting(optimizer: str, key: str, value: Any) -> None:
    """Raise a clear error unless a setting is a positive finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise EvomergeError(f"optimizer {optimizer}: {key} must be a positive number, got {value!r}")


def check_problem(cls: type[Optimizer], dim: int, names: Sequence[str], directions: Sequence[str]) -> None:
    """Raise a clear error when a search problem does not fit the backend ``cls``."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise EvomergeError(f"optimizer {cls.name}: dim must be an integer >= 1, got {dim!r}")
    if len(names) != dim:
        raise EvomergeError(f"optimizer {cls.name}: {len(names)} gene names for dim {dim}")
    if len(set(names)) != len(names):
        dup = next(n for n in names if list(names).count(n) > 1)
        raise EvomergeError(f"optimizer {cls.name}: gene name {dup!r} appears twice")
    if not directions:
        raise EvomergeError(f"optimizer {cls.name}: no objective direction given")
    bad = [d for d in directions if d not in DIRECTIONS]
    if bad:
        raise EvomergeError(f"optimizer {cls.name}: direction {bad[0]!r}; use {' or '.join(DIRECTIONS)}")
    if len(directions) > 1 and not cls.multi_objective:
        raise EvomergeError(
            f"optimizer {cls.name} handles one objective, got {len(directions)}; "
            "use tpe, nsga2 or random for several objectives, or combine them into one score"
        )
