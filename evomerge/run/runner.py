"""The search loop: ask → decode → evaluate on a free worker → journal → tell, and resume.

Every worker is kept busy: as soon as one finishes, the next candidate is
asked and sent to it. Asynchronous optimizers (Optuna samplers, random) never
wait for a generation; pycma's generational ``tell`` makes workers idle at the
end of each generation while the last candidates finish (at most
``popsize - 1`` worker-slots per generation; keep ``workers`` a divisor of the
population to limit it).

Persistence order makes resume exact: the optimizer state is saved after every
ask and every tell, and a result is journaled (fsynced) *before* it is told. So
after any interruption the journal and the state differ by at most the one
result being told; resume tells it from the journal, re-runs candidates that
were asked but never journaled (the in-flight ones) with their original genome
and id, and goes on. No finished evaluation is lost or repeated; with one
worker and a fixed seed the resumed journal equals an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.optimize.base import CorruptStateError
from evomerge.run.executor import Candidate, Executor, Finished
from evomerge.run.rundir import FROZEN, OPTIMIZER, Evaluation, RunDir
from evomerge.run.screening import estimate, split_batch
from evomerge.spaces.space import SearchSpace

log = logging.getLogger(__name__)

#: a run whose first this-many evaluations all fail with one error stops: that is a misconfiguration
#: (a misnamed metric, a broken evaluator), and the rest of the budget would fail the same way
FAIL_FAST = 5


@dataclass
class RunProgress:
    """What the progress display shows; updated after every event."""

    total: int
    done: int = 0
    failed: int = 0
    best: Evaluation | None = None
    session_done: int = 0
    session_start: float = field(default_factory=time.monotonic)
    workers: dict[int, str] = field(default_factory=dict)
    retried: int = 0
    #: candidates screened out by the surrogate (not counted in ``done``)
    screened: int = 0
    #: wall seconds of this session's loop, from workers ready to the last result
    loop_seconds: float = 0.0
    #: the first worker's memory plan (where its pool of source weights lives, and why)
    memory: str = ""

    @property
    def evals_per_min(self) -> float:
        elapsed = time.monotonic() - self.session_start
        return 60.0 * self.session_done / elapsed if elapsed > 0 else 0.0


def rank_key(e: Evaluation, directions: list[str]) -> tuple:
    """Sort key of a successful evaluation, best first: its objectives in order, each in its direction, then
    its id. Ties on the first objective go to the next ones, so the best is always on the Pareto front."""
    return (*(-v if d == "maximize" else v for v, d in zip(e.fitness, directions)), e.id)


def better(a: Evaluation, b: Evaluation | None, directions: list[str]) -> bool:
    """Whether ``a`` ranks above ``b`` (``rank_key``)."""
    return b is None or rank_key(a, directions) < rank_key(b, directions)


def ranked(evaluations: list[Evaluation], directions: list[str]) -> list[Evaluation]:
    """Successful full evaluations (screened ones only have estimates), best first (``rank_key``)."""
    return sorted((e for e in evaluations if e.ok and not e.screened), key=lambda e: rank_key(e, directions))


class Runner:
    """Drives one run directory to its budget; see the module doc."""

    def __init__(self, run: RunDir, executor_factory: Callable[[SearchSpace], Executor], *,
                 on_event: Callable[[RunProgress], None] | None = None, max_retries: int = 2) -> None:
        self.run_dir = run
        self.space = run.space()
        self.genome = self.space.build_genome()
        self.objective = self.space.objective
        self.on_event = on_event or (lambda progress: None)
        self.max_retries = max_retries
        self._executor_factory = executor_factory
        #: whether this process started the optimizer afresh (its state set aside): nothing to restore
        self._fresh = False
        try:
            self.optimizer = self._build_optimizer()
        except CorruptStateError as exc:  # a backend that reads its state when built (Optuna's journal)
            if not self.run_dir.journal():
                raise
            self.optimizer = self._rebuild(str(exc))
        self.done: dict[int, Evaluation] = {}
        self.queue: list[Candidate] = []
        self.progress = RunProgress(total=self.space.budget)
        #: candidates since the last scored surrogate probe, all failed before their full evaluation
        self._fruitless = 0

    def _build_optimizer(self):
        from evomerge.optimize import build_optimizer

        return build_optimizer(
            self.space.optimizer.name, dim=self.genome.dim, names=self.genome.names,
            directions=self.objective.directions, seed=self.space.seed, state_dir=self.run_dir.optimizer_dir,
            settings=dict(self.space.optimizer.settings), x0=self.genome.x0(),
        )

    def _rebuild(self, why: str):
        """Set an unusable optimizer state aside and start a fresh optimizer (``_recover`` replays the journal).

        The search as started (``space.json``) stays: it is the run's, not the optimizer's, and guards
        every later resume against an edited config.
        """
        state = self.run_dir.optimizer_dir
        aside = state.with_name(f"{OPTIMIZER}.corrupt-{int(time.time())}")
        while aside.exists():
            aside = aside.with_name(aside.name + "+")
        os.replace(state, aside)
        state.mkdir()
        if (aside / FROZEN).is_file():
            shutil.copy2(aside / FROZEN, state / FROZEN)
        log.warning("%s; moved the optimizer state to %s and rebuilding it from the journal", why, aside)
        self._fresh = True
        return self._build_optimizer()

    # -- resume --------------------------------------------------------------
    def _recover(self) -> None:
        """Bring optimizer, journal and queue into agreement (a fresh run is the trivial case)."""
        journal = self.run_dir.journal(repair=True)  # refuses a candidate id journaled twice
        self.done = {e.id: e for e in journal}
        # evaluations journaled before sessions were numbered count as the first session's
        self.session = 1 + max((e.session or 1 for e in journal), default=0)
        try:
            restored = self.optimizer.restore()
        except CorruptStateError as exc:
            if not self.done:
                raise
            restored = False
            self.optimizer = self._rebuild(str(exc))
        if restored and self._older_than_journal():
            restored = False
            self.optimizer = self._rebuild(f"{self.optimizer.state_path}: older than the journal")
        elif (not restored and self.done and not self._fresh
              and any(p.name != FROZEN for p in self.run_dir.optimizer_dir.iterdir())):
            # e.g. Optuna's study without the sampler state: replayed into, it would hold two histories
            self.optimizer = self._rebuild(f"{self.optimizer.state_path}: missing")
        if restored:
            for cid, x in self.optimizer.pending().items():
                if cid in self.done:  # journaled, but the process died before telling it
                    self._tell(self.done[cid])
                else:
                    self.queue.append(self._candidate(cid, x))
        elif self.done:
            self._replay()
        for e in self.done.values():
            self._count(e)

    def _older_than_journal(self) -> bool:
        """Whether the journal holds candidates the restored state never asked (a stale copy of it);
        refuse a journal that lacks candidates the state has scored (it was truncated or replaced)."""
        asked, pending = self.optimizer.asked, self.optimizer.pending()
        lost = [i for i in range(asked) if i not in pending and i not in self.done]
        if lost:
            ids = ", ".join(f"#{i}" for i in lost[:5]) + (f" and {len(lost) - 5} more" if len(lost) > 5 else "")
            raise EvomergeError(
                f"{self.run_dir.journal_file}: candidates {ids} were scored (the optimizer state in "
                f"{self.run_dir.optimizer_dir} holds their results) but are not in the journal: it was truncated "
                "or replaced. Restore it, or start a new run")
        return any(i >= asked for i in self.done)

    def _replay(self) -> None:
        """Rebuild a lost optimizer state by asking again and telling the journal's results."""
        log.warning("%s: no optimizer state; rebuilding it from the journal (%d evaluations)",
                    self.run_dir.optimizer_dir, len(self.done))
        mismatched = 0
        for cid in range(max(self.done) + 1):
            ask = self.optimizer.ask()
            if ask is None or ask.id != cid:
                raise EvomergeError(
                    f"{self.run_dir.optimizer_dir}: optimizer state is missing and cannot be rebuilt from the journal; "
                    "start a new run (the journal stays readable with `evomerge status`)"
                )
            if cid in self.done:
                mismatched += not np.allclose(ask.x, self.done[cid].x)
                self._tell(self.done[cid])
            else:
                self.queue.append(self._candidate(cid, ask.x))
        self.optimizer.save()
        if mismatched:
            log.warning("%d replayed genomes differ from the journal's (its candidates were asked and told in "
                        "another order: several workers, or a resume); their scores were told anyway", mismatched)

    # -- candidates ----------------------------------------------------------
    def _candidate(self, cid: int, x) -> Candidate:
        x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
        genes = self.genome.values(x)
        try:
            recipe = self.genome.decode(x).to_dict()
        except EvomergeError as exc:
            return Candidate(cid, x, genes, {}, decode_error=str(exc))
        return Candidate(cid, x, genes, recipe)

    def _tell(self, evaluation: Evaluation) -> None:
        self.optimizer.tell(evaluation.id, evaluation.fitness if evaluation.ok else None)
        self.optimizer.save()

    def _full_count(self) -> int:
        """Evaluations that count against the budget: all but the screened ones."""
        return len(self.done) - self.progress.screened

    def _count(self, e: Evaluation) -> None:
        self.progress.screened += e.screened
        self.progress.done = self._full_count()
        self.progress.failed += not e.ok
        if e.ok and not e.screened and better(e, self.progress.best, self.objective.directions):
            self.progress.best = e

    def _record(self, candidate: Candidate, result: dict, *, attempts: int | None = None,
                surrogate: float | None = None, estimate: list[float] | None = None,
                screened: bool = False) -> Evaluation:
        """Journal and tell one result; ``estimate`` marks a screened candidate and is what it is told.

        ``screened``: the candidate never reached its full evaluation (its genes decode to no recipe, or
        its surrogate probe failed), so it does not count against the budget either.
        """
        status, metrics, error = result["status"], result.get("metrics", {}), result.get("error")
        fitness = estimate
        if status == "ok" and estimate is None:
            try:
                fitness = self.objective.values(metrics)
            except KeyError as exc:
                status, error = "failed", str(exc.args[0])
        seconds = float(result.get("seconds", 0.0))
        # results made here (a genome that does not decode, a worker that died) carry no worker times
        finished = result.get("finished", time.time())
        evaluation = Evaluation(
            id=candidate.id, genes=candidate.genes, x=[float(v) for v in candidate.x], recipe=candidate.recipe,
            metrics=metrics, fitness=fitness, status=status, error=error, worker=result.get("worker"),
            seconds=round(seconds, 4), attempts=candidate.attempts + 1 if attempts is None else attempts,
            surrogate=surrogate, screened=screened or estimate is not None,
            started=result.get("started", finished - seconds), finished=finished, session=self.session,
        )
        self.run_dir.append(evaluation)
        self._tell(evaluation)
        self.done[candidate.id] = evaluation
        self._count(evaluation)
        self.progress.session_done += 1
        if self.progress.failed == len(self.done) >= FAIL_FAST and len({e.error for e in self.done.values()}) == 1:
            raise EvomergeError(f"the first {len(self.done)} candidates all failed with the same error, "
                                f"a misconfiguration rather than bad luck: {evaluation.error}")
        return evaluation

    # -- loop ----------------------------------------------------------------
    def run(self) -> RunProgress:
        """Evaluate until the budget is spent; Ctrl-C stops (resume continues from the journal)."""
        self._recover()
        budget = self.space.budget
        if self._full_count() >= budget and not self.queue:
            return self.progress
        executor = self._executor_factory(self.space)
        try:
            infos = executor.start()
            self.progress.session_start = time.monotonic()  # rates count evaluation time, not start-up
            self.progress.workers = {i["worker"]: f"idle ({i['device']})" for i in infos}
            self.progress.memory = infos[0].get("memory", "") if infos else ""
            self.on_event(self.progress)
            if self.space.surrogate is None:
                self._loop(executor, budget)
            else:
                self._screened_loop(executor, budget)
            self.progress.loop_seconds = time.monotonic() - self.progress.session_start
        finally:
            executor.shutdown()
        return self.progress

    def _next(self, budget: int, inflight: int) -> Candidate | None:
        if self.queue:
            return self.queue.pop(0)
        if self._full_count() + inflight >= budget:
            return None
        ask = self.optimizer.ask()
        if ask is None:  # generational optimizer waiting for this generation's results
            return None
        self.optimizer.save()
        return self._candidate(ask.id, ask.x)

    def _loop(self, executor: Executor, budget: int) -> None:
        free = list(range(executor.workers))
        inflight = 0
        workers = self.progress.workers
        while True:
            while free:
                candidate = self._next(budget, inflight)
                if candidate is None:
                    break
                if candidate.decode_error is not None:
                    self._record(candidate, {"status": "failed", "error": candidate.decode_error})
                    continue
                worker = free.pop(0)
                executor.submit(worker, candidate)
                inflight += 1
                workers[worker] = f"evaluating #{candidate.id}"
            self.on_event(self.progress)
            if not inflight:
                if self._full_count() < budget and not self.queue:
                    raise EvomergeError("the optimizer stopped asking before the budget was spent")
                return
            for finished in executor.wait(timeout=0.5):
                inflight -= 1
                self._finish(executor, finished)  # a dead worker is replaced before this returns
                free.append(finished.worker)
                workers[finished.worker] = "idle"

    def _finish(self, executor: Executor, finished: Finished) -> None:
        candidate = finished.candidate
        if finished.lost is None:
            self._record(candidate, finished.result)
            return
        failed = self._lost(executor, finished)
        if failed is None:
            self.queue.insert(0, candidate)
        else:
            self._record(candidate, failed, attempts=candidate.attempts)

    def _lost(self, executor: Executor, finished: Finished) -> dict | None:
        """Replace a dead worker; ``None`` when its candidate should be retried, else the failed result."""
        candidate = finished.candidate
        candidate.attempts += 1
        self.progress.retried += 1
        log.warning("worker %d died evaluating #%d (%s)", finished.worker, candidate.id, finished.lost)
        self.progress.workers[finished.worker] = "restarting"
        self.on_event(self.progress)
        executor.replace(finished.worker)
        if candidate.attempts <= self.max_retries:
            return None
        return {"status": "failed", "worker": finished.worker,
                "error": f"worker died {candidate.attempts} times: {finished.lost}"}

    # -- screening -------------------------------------------------------------
    def _screened_loop(self, executor: Executor, budget: int) -> None:
        """Batches ranked by the surrogate; the best ``keep`` fraction evaluated fully (see run.screening)."""
        surrogate = self.space.surrogate
        size = surrogate.batch or 4 * executor.workers
        while True:
            if self.queue:  # in flight when the run stopped: evaluated fully, as without screening
                batch, self.queue = self.queue, []
                for candidate, result in self._map(executor, batch):
                    self._record(candidate, result)
                continue
            remaining = budget - self._full_count()
            if remaining <= 0:
                return
            asked = []
            while len(asked) < min(size, math.ceil(remaining / surrogate.keep)):
                ask = self.optimizer.ask()
                if ask is None:  # a generational optimizer's generation is complete
                    break
                self.optimizer.save()
                asked.append(self._candidate(ask.id, ask.x))
            if not asked:
                raise EvomergeError("the optimizer stopped asking before the budget was spent")
            self._screen(executor, asked, remaining)

    def _screen(self, executor: Executor, asked: list[Candidate], remaining: int) -> None:
        surrogate = self.space.surrogate
        scores: dict[int, float] = {}
        probes: dict[int, dict] = {}
        by_id = {c.id: c for c in asked}
        for candidate in asked:
            if candidate.decode_error is not None:
                self._record(candidate, {"status": "failed", "error": candidate.decode_error}, screened=True)
        to_probe = [dataclasses.replace(c, mode="surrogate") for c in asked if c.decode_error is None]
        for candidate, result in self._map(executor, to_probe):
            probes[candidate.id] = result
            try:
                if result["status"] != "ok":
                    raise KeyError(result.get("error"))
                scores[candidate.id] = surrogate.value(result["metrics"])
            except KeyError as exc:  # a candidate the surrogate cannot score fails before its full evaluation
                self._record(by_id[candidate.id], {**result, "status": "failed", "error": f"surrogate: {exc.args[0]}"},
                             screened=True)
        # such failures spend no budget: a batch without one probe scored makes no progress, and
        # batches like that, one after another, must not go on forever
        self._fruitless = 0 if scores else self._fruitless + len(asked)
        if self._fruitless >= self.space.budget:
            raise EvomergeError(f"the last {self._fruitless} candidates all failed before their full evaluation "
                                f"(as many as the budget); the last with: {self.done[asked[-1].id].error}")
        if not scores:
            return
        kept, screened = split_batch(scores, surrogate.keep, surrogate.direction, remaining)
        batch_fitness = []
        for candidate, result in self._map(executor, [by_id[cid] for cid in kept]):
            evaluation = self._record(candidate, result, surrogate=scores[candidate.id])
            if evaluation.ok:
                batch_fitness.append(evaluation.fitness)
        history = [(e.surrogate, e.fitness) for e in self.done.values()
                   if e.ok and not e.screened and e.surrogate is not None]
        for cid in screened:
            if not batch_fitness:
                self._record(by_id[cid], {"status": "failed", "error": "screened out, and no candidate of its batch "
                                                                       "was evaluated successfully to estimate from"})
                continue
            told = estimate(scores[cid], history, batch_fitness, self.objective.directions)
            # journaled with the probe's worker and times: the surrogate is the work done on it
            self._record(by_id[cid], {**probes[cid], "status": "ok", "metrics": {}, "error": None},
                         surrogate=scores[cid], estimate=told)

    def _map(self, executor: Executor, candidates: list[Candidate]) -> list[tuple[Candidate, dict]]:
        """Evaluate ``candidates`` on the pool (all workers idle on entry) and return every result."""
        pending, free, inflight, out = list(candidates), list(range(executor.workers)), 0, []
        workers = self.progress.workers
        while pending or inflight:
            while free and pending:
                candidate, worker = pending.pop(0), free.pop(0)
                executor.submit(worker, candidate)
                inflight += 1
                workers[worker] = f"{'screening' if candidate.mode == 'surrogate' else 'evaluating'} #{candidate.id}"
            self.on_event(self.progress)
            for finished in executor.wait(timeout=0.5):
                inflight -= 1
                if finished.lost is None:
                    out.append((finished.candidate, finished.result))
                else:
                    failed = self._lost(executor, finished)
                    if failed is None:
                        pending.insert(0, finished.candidate)
                    else:
                        out.append((finished.candidate, failed))
                free.append(finished.worker)
                workers[finished.worker] = "idle"
        return out
