"""Optuna samplers (TPE, CMA-ES, NSGA-II) behind the ask/tell interface.

Every candidate is a real Optuna trial in a journal file (``state_dir/optuna.log``,
study ``"evomerge"``) whose parameters are the gene names, so optuna-dashboard
can open a run while it is going. Failed candidates are told as COMPLETE with the
worst value so far (the sampler must learn that the region is bad; a FAIL trial
would be ignored) and carry the user attribute ``evomerge_failed``; every trial
carries ``evomerge_id``, the candidate id.

Exact resume (but for CmaEsSampler after a kill with a candidate in flight: it
seeds each sample with the trial number, which the re-ask below shifts, so the
run goes on along another path): Optuna's samplers keep their RNG in memory, so the state file
holds the pickled sampler (Optuna's documented way to resume reproducibly),
saved after every ask. ``restore`` then repairs what a kill left in the journal:

* trials still RUNNING are told FAIL (a journal has no heartbeats);
* each of our pending candidates is enqueued with its parameters and asked again,
  so its id keeps its genome under a new trial number;
* a RUNNING trial we never saved (asked just before the kill) is only failed: the
  restored sampler proposes the same point again;
* a pending candidate whose trial the journal already shows COMPLETE (killed
  between Optuna's tell and our save) keeps that trial; its second tell only
  updates our bookkeeping.

Optuna's trials in flight are up to the runner; CmaEsSampler wastes trials beyond
``popsize`` in one generation, so keep at most that many outstanding.
"""

from __future__ import annotations

import json
import logging
from abc import abstractmethod
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.optimize.base import CorruptStateError, Optimizer, check_int_setting, check_positive_setting

JOURNAL_FILE = "optuna.log"
STUDY_NAME = "evomerge"


def _check_log(path: Path) -> None:
    """Every line of Optuna's journal log is one JSON record.

    Optuna reads up to a torn line but appends after it, which breaks the next
    read; a damaged log is reported (the runner then rebuilds the study from
    the run's journal) rather than written to.
    """
    if not path.exists():
        return
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        try:
            json.loads(line)
        except ValueError:
            raise CorruptStateError(f"{path}: line {number} is not an Optuna journal record") from None


class OptunaOptimizer(Optimizer):
    """Common ask/tell and resume logic; subclasses only choose the sampler."""

    asynchronous = True

    def __init__(self, *, settings: dict[str, Any], **common: Any) -> None:
        super().__init__(settings=settings, **common)
        import optuna
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        optuna.logging.set_verbosity(logging.WARNING)
        path = self.state_dir / JOURNAL_FILE
        _check_log(path)
        self._storage = JournalStorage(JournalFileBackend(str(path)))
        self._study = self._open_study(self._make_sampler())
        self._trials: dict[int, optuna.Trial] = {}  # pending id -> its live trial
        self._recorded: dict[int, int] = {}  # pending id -> its trial, which the journal already completed

    @abstractmethod
    def _make_sampler(self) -> Any:
        """A fresh sampler seeded with ``self.seed``."""

    def _open_study(self, sampler: Any) -> Any:
        import optuna

        return optuna.create_study(
            study_name=STUDY_NAME,
            storage=self._storage,
            sampler=sampler,
            directions=self.directions,
            load_if_exists=True,
        )

    def _propose(self, id: int) -> list[float]:
        if id == 0 and self.x0 is not None:
            self._study.enqueue_trial(dict(zip(self.names, map(float, self.x0))))  # the start point first
        trial = self._study.ask()
        x = [trial.suggest_float(name, 0.0, 1.0) for name in self.names]
        trial.set_user_attr("evomerge_id", id)
        self._trials[id] = trial
        return x

    def _learn(self, id: int, x: Any, values: list[float] | None) -> None:
        if self._recorded.pop(id, None) is not None:
            return
        trial = self._trials.pop(id)
        if values is None:
            trial.set_user_attr("evomerge_failed", True)
            values = self.failure_values()
        self._study.tell(trial, values)

    def _get_state(self) -> Any:
        numbers = {id: trial.number for id, trial in self._trials.items()} | self._recorded
        return {"sampler": self._study.sampler, "trial_numbers": numbers}

    def _set_state(self, state: Any | None) -> None:
        from optuna.trial import TrialState

        before = self._fail_leftovers()
        if state is None:
            return
        if len(before) < self._next_id:  # every candidate asked made a trial
            raise CorruptStateError(f"{self.state_dir / JOURNAL_FILE}: holds {len(before)} trials, but "
                                    f"{self._next_id} candidates were asked; the log was deleted or replaced")
        self._study = self._open_study(state["sampler"])
        study_id = self._storage.get_study_id_from_name(STUDY_NAME)
        for id, x in self._pending.items():
            old = before.get(state["trial_numbers"][id])
            if old is None:
                raise CorruptStateError(
                    f"{self.state_dir / JOURNAL_FILE}: trial {state['trial_numbers'][id]} of candidate {id} "
                    "is missing; the journal does not belong to this optimizer state"
                )
            if old.state == TrialState.COMPLETE:
                self._recorded[id] = old.number
                continue
            self._study.enqueue_trial(dict(zip(self.names, map(float, x))))
            trial = self._study.ask()
            for name in self.names:
                trial.suggest_float(name, 0.0, 1.0)  # records the fixed value in the trial
            trial.set_user_attr("evomerge_id", id)
            # Samplers file their bookkeeping (CMA generation, NSGA-II parents) in system
            # attributes; the copy makes them count the result as the original trial's.
            new_id = self._storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            for key, value in old.system_attrs.items():
                if key != "fixed_params":
                    self._storage.set_trial_system_attr(new_id, key, value)
            self._trials[id] = trial

    def _fail_leftovers(self) -> dict[int, Any]:
        """Fail what a kill left open; return every trial as it was before, by number."""
        from optuna.trial import TrialState

        # An enqueued trial not yet asked would hijack the next ask: take it out first.
        for _ in self._study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            self._study.tell(self._study.ask(), state=TrialState.FAIL)
        before = {trial.number: trial for trial in self._study.get_trials()}
        for trial in before.values():
            if trial.state == TrialState.RUNNING:
                self._study.tell(trial.number, state=TrialState.FAIL)
        return before


class Tpe(OptunaOptimizer):
    """Optuna's TPE: asynchronous, one or several objectives."""

    name = "tpe"
    multi_objective = True

    def __init__(self, *, n_startup_trials: int = 10, **common: Any) -> None:
        check_int_setting(self.name, "n_startup_trials", n_startup_trials, 0)
        super().__init__(settings={"n_startup_trials": n_startup_trials}, **common)

    def _make_sampler(self) -> Any:
        import optuna

        return optuna.samplers.TPESampler(n_startup_trials=self.settings["n_startup_trials"], seed=self.seed)


class OptunaCmaEs(OptunaOptimizer):
    """Optuna's CmaEsSampler: CMA-ES without a barrier, state kept in the journal.

    ``sigma0`` None means Optuna's default, 1/6 of the box as in the paper; Optuna
    deprecated passing it (v4.9, removal planned for v6), so it is passed only when set.
    """

    name = "optuna_cmaes"
    multi_objective = False

    def __init__(self, *, popsize: int | None = None, sigma0: float | None = None, **common: Any) -> None:
        check_int_setting(self.name, "popsize", popsize, 2)
        if sigma0 is not None:
            check_positive_setting(self.name, "sigma0", sigma0)
        super().__init__(settings={"popsize": popsize, "sigma0": sigma0}, **common)

    def _make_sampler(self) -> Any:
        import optuna

        try:
            import cmaes  # noqa: F401  (Optuna imports it lazily, with a less helpful message)
        except ImportError:
            raise EvomergeError("optimizer optuna_cmaes needs the 'cmaes' package: pip install cmaes") from None
        sigma0 = self.settings["sigma0"]
        return optuna.samplers.CmaEsSampler(
            popsize=self.settings["popsize"],
            seed=self.seed,
            # The first trial is always independent (define-by-run): not worth a warning.
            warn_independent_sampling=False,
            **({} if sigma0 is None else {"sigma0": float(sigma0)}),
        )


class Nsga2(OptunaOptimizer):
    """Optuna's NSGA-II: a genetic algorithm for several objectives (Pareto front)."""

    name = "nsga2"
    multi_objective = True

    def __init__(self, *, population_size: int = 50, **common: Any) -> None:
        check_int_setting(self.name, "population_size", population_size, 2)
        super().__init__(settings={"population_size": population_size}, **common)

    def _make_sampler(self) -> Any:
        import optuna

        return optuna.samplers.NSGAIISampler(population_size=self.settings["population_size"], seed=self.seed)
