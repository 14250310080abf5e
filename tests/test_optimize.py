"""Ask/tell optimizers: they optimize, they score failures, and they resume exactly."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from evomerge.errors import EvomergeError
from evomerge.optimize import OPTIMIZERS, Ask, build_optimizer

DIM = 4
NAMES = [f"gene_{i}" for i in range(DIM)]
TARGET = 0.3


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch):
    """Skip fsync: these tests kill processes, not power, and Optuna's journal
    syncs once per parameter, which would make up most of their run time."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


def sphere(x: np.ndarray) -> float:
    return float(np.sum((np.asarray(x) - TARGET) ** 2))


def make(name, tmp_path, directions=("minimize",), seed=0, dim=DIM, **settings):
    return build_optimizer(
        name,
        dim=dim,
        names=NAMES[:dim] if dim <= DIM else [f"g{i}" for i in range(dim)],
        directions=list(directions),
        seed=seed,
        state_dir=tmp_path,
        settings=settings,
    )


def fails(id: int) -> bool:
    """Candidates that a test run treats as failed merges."""
    return id % 7 == 5


def run(name, state_dir, calls, *, workers=1, restart=None, **settings):
    """Drive a backend like the runner would, for ``calls`` ask/tell calls.

    Up to ``workers`` candidates are outstanding; the oldest is told first. With
    ``restart="always"`` every call is followed by save, a brand-new optimizer and
    restore, as after a kill; with ``"idle"`` only calls after which nothing is
    pending. Returns the (id, x) sequence that was asked.
    """
    opt = make(name, state_dir, **settings)
    assert opt.restore() is False
    asked: list[tuple[int, np.ndarray]] = []
    for _ in range(calls):
        pending = opt.pending()
        ask = opt.ask() if len(pending) < workers else None
        if ask is not None:
            asked.append((ask.id, ask.x))
        else:
            id, x = next(iter(pending.items()))
            opt.tell(id, None if fails(id) else [sphere(x)])
        opt.save()
        pending = opt.pending()
        if restart == "always" or (restart == "idle" and not pending):
            opt = make(name, state_dir, **settings)
            assert opt.restore() is True
            assert list(opt.pending()) == list(pending)
            assert all(np.array_equal(opt.pending()[id], x) for id, x in pending.items())
    return asked


def assert_same_sequence(a, b):
    assert [id for id, _ in a] == [id for id, _ in b]
    for (_, xa), (_, xb) in zip(a, b):
        assert np.array_equal(xa, xb)


# -- optimization oracles --------------------------------------------------

CONVERGING = ["cmaes", "tpe", "optuna_cmaes"]


def optimize(opt, objective, evaluations):
    """Sequential ask/tell (whole generations for generational backends); best value seen."""
    best = []
    while len(best) < evaluations:
        batch = []
        while (ask := opt.ask()) is not None:
            batch.append(ask)
            if opt.asynchronous:
                break
        for ask in batch:
            value = objective(ask.x)
            best.append(value)
            opt.tell(ask.id, [value])
    return best


@pytest.mark.parametrize("name", CONVERGING)
def test_minimizes_sphere(name, tmp_path):
    values = optimize(make(name, tmp_path), sphere, 120)
    at_x0 = sphere(np.full(DIM, 0.5))
    assert min(values) < at_x0 / 8


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_maximize_mirrors_minimize(name, tmp_path):
    # Maximizing -f must take exactly the steps that minimizing f takes: the backend,
    # not the caller, handles the sign.
    minimized = optimize(make(name, tmp_path / "min"), sphere, 40)
    maximized = optimize(make(name, tmp_path / "max", directions=["maximize"]), lambda x: -sphere(x), 40)
    assert maximized == [-v for v in minimized]


def test_asks_stay_in_the_unit_box(tmp_path):
    for name in OPTIMIZERS:
        opt = make(name, tmp_path / name, sigma0=2.0) if name == "cmaes" else make(name, tmp_path / name)
        for ask in [opt.ask() for _ in range(4)]:
            assert isinstance(ask, Ask)
            assert ask.x.dtype == np.float64 and ask.x.shape == (DIM,)
            assert np.all((ask.x >= 0) & (ask.x <= 1))


def test_ids_count_up_and_pending_keeps_ask_order(tmp_path):
    opt = make("random", tmp_path)
    asks = [opt.ask() for _ in range(3)]
    assert [a.id for a in asks] == [0, 1, 2]
    opt.tell(1, [0.0])
    assert list(opt.pending()) == [0, 2]
    assert np.array_equal(opt.pending()[2], asks[2].x)
    assert opt.ask().id == 3


# -- pycma's generation barrier -------------------------------------------


def test_cmaes_barrier_and_default_popsize(tmp_path):
    dim = 10
    opt = make("cmaes", tmp_path, dim=dim)
    popsize = 4 + math.floor(3 * math.log(dim))
    assert opt.popsize == popsize
    first = [opt.ask() for _ in range(popsize)]
    assert all(a is not None for a in first)
    assert opt.ask() is None  # nothing more until the generation is told
    for ask in first[:-1]:
        opt.tell(ask.id, [sphere(ask.x[:DIM])])
        assert opt.ask() is None
    opt.tell(first[-1].id, [sphere(first[-1].x[:DIM])])
    second = opt.ask()
    assert second is not None and second.id == popsize
    assert not any(np.array_equal(second.x, a.x) for a in first)


def test_cmaes_popsize_setting(tmp_path):
    opt = make("cmaes", tmp_path, popsize=3)
    assert [opt.ask() is None for _ in range(4)] == [False, False, False, True]


# -- failures --------------------------------------------------------------


def test_failure_is_scored_as_worst_value(tmp_path):
    opt = make("random", tmp_path, directions=["minimize", "maximize"])
    assert opt.failure_values() == [1e12, -1e12]  # nothing succeeded yet
    for values in ([1.0, 5.0], [3.0, 7.0], [2.0, 4.0]):
        opt.tell(opt.ask().id, values)
    opt.tell(opt.ask().id, None)
    assert opt.failure_values() == [3.0, 4.0]  # worst per objective, failures excluded
    opt.save()
    restored = make("random", tmp_path, directions=["minimize", "maximize"])
    restored.restore()
    assert restored.failure_values() == [3.0, 4.0]


def test_cmaes_failure_ranks_with_the_worst_of_its_generation(tmp_path, monkeypatch):
    opt = make("cmaes", tmp_path, popsize=4, directions=["maximize"])
    told = {}
    monkeypatch.setattr(opt._es, "tell", lambda X, f: told.update(X=X, f=f))
    asks = [opt.ask() for _ in range(4)]
    opt.tell(asks[0].id, None)  # scored at the end of the generation, not now
    for ask, value in zip(asks[1:], [5.0, 1.0, 3.0]):
        opt.tell(ask.id, [value])
    # pycma minimizes: maximized values are negated, the failure gets the worst (1.0).
    assert told["f"] == [-1.0, -5.0, -1.0, -3.0]
    assert all(np.allclose(np.clip(x, 0, 1), a.x) for x, a in zip(told["X"], asks))


def test_optuna_failure_is_a_complete_trial_with_the_worst_value(tmp_path):
    import optuna

    opt = make("tpe", tmp_path)
    first, second = opt.ask(), opt.ask()
    opt.tell(first.id, [2.0])
    opt.tell(second.id, None)
    trials = opt._study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert trials[1].values == [2.0]
    assert trials[1].user_attrs == {"evomerge_id": 1, "evomerge_failed": True}
    assert trials[0].params == dict(zip(NAMES, first.x))


# -- exact resume ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "workers", "calls", "settings"),
    [
        ("cmaes", 10, 80, {}),  # more workers than popsize (8): asks run into the barrier
        ("random", 3, 40, {}),
        ("tpe", 1, 40, {"n_startup_trials": 4}),  # sequential: ask, tell, ask, ...
        ("nsga2", 1, 40, {"population_size": 4}),
    ],
)
def test_restore_after_every_call_gives_the_same_asks(name, workers, calls, settings, tmp_path):
    straight = run(name, tmp_path / "straight", calls, workers=workers, **settings)
    resumed = run(name, tmp_path / "resumed", calls, workers=workers, restart="always", **settings)
    assert len(straight) >= calls // 2 - 1
    assert_same_sequence(straight, resumed)


def test_optuna_cmaes_restore(tmp_path):
    # CmaEsSampler seeds each sample with the trial number, which a pending candidate's
    # re-ask shifts: exact only for restores with nothing pending; otherwise it goes on.
    straight = run("optuna_cmaes", tmp_path / "straight", 40, popsize=4)
    assert_same_sequence(straight, run("optuna_cmaes", tmp_path / "idle", 40, restart="idle", popsize=4))
    resumed = run("optuna_cmaes", tmp_path / "always", 40, restart="always", popsize=4)
    assert [id for id, _ in resumed] == [id for id, _ in straight]


def test_cmaes_resume_does_not_depend_on_numpy_global_rng(tmp_path):
    straight = run("cmaes", tmp_path / "a", 30, workers=8)
    np.random.seed(12345)
    opt = make("cmaes", tmp_path / "b")
    asked = []
    for _ in range(30):
        pending = opt.pending()
        ask = opt.ask() if len(pending) < 8 else None
        if ask is not None:
            asked.append((ask.id, ask.x))
            np.random.rand(3)  # someone else draws from the global RNG
        else:
            id, x = next(iter(pending.items()))
            opt.tell(id, None if fails(id) else [sphere(x)])
    assert_same_sequence(straight, asked)


def test_optuna_resume_after_kill_fails_leftovers_and_keeps_pending(tmp_path):
    import optuna

    opt = make("tpe", tmp_path)
    for _ in range(3):
        ask = opt.ask()
        opt.tell(ask.id, [sphere(ask.x)])
    kept = opt.ask()
    opt.save()
    opt.ask()  # asked but never saved: the kill came first
    opt._study.enqueue_trial(dict.fromkeys(NAMES, 0.0))  # a restore killed before its re-ask
    del opt

    opt = make("tpe", tmp_path)
    assert opt.restore() is True
    states = [t.state for t in opt._study.get_trials()]
    assert optuna.trial.TrialState.RUNNING not in states[:-1]
    assert states[-1] == optuna.trial.TrialState.RUNNING  # the re-asked pending candidate
    assert list(opt.pending()) == [kept.id]
    assert np.array_equal(opt.pending()[kept.id], kept.x)
    opt.tell(kept.id, [sphere(kept.x)])
    last = opt._study.get_trials()[-1]
    assert last.params == dict(zip(NAMES, kept.x)) and last.user_attrs["evomerge_id"] == kept.id
    assert opt.ask().id == kept.id + 1
    assert [t.state for t in opt._study.get_trials()].count(optuna.trial.TrialState.RUNNING) == 1


def test_optuna_tell_journaled_but_not_saved_is_not_recorded_twice(tmp_path):
    opt = make("tpe", tmp_path)
    ask = opt.ask()
    opt.save()
    opt.tell(ask.id, [1.0])  # reached the journal; the kill came before save()
    opt = make("tpe", tmp_path)
    opt.restore()
    assert list(opt.pending()) == [ask.id]
    opt.tell(ask.id, [1.0])  # the runner tells it again
    assert [t.values for t in opt._study.get_trials()] == [[1.0]]


def test_nsga2_two_objectives(tmp_path):
    opt = make("nsga2", tmp_path, directions=["minimize", "maximize"], population_size=6)
    for _ in range(30):
        ask = opt.ask()
        opt.tell(ask.id, None if ask.id == 3 else [sphere(ask.x), float(ask.x[0])])
    assert len(opt._study.best_trials) >= 1


def test_restore_refuses_a_different_configuration(tmp_path):
    opt = make("cmaes", tmp_path)
    opt.ask()
    opt.save()
    with pytest.raises(EvomergeError, match="popsize"):
        make("cmaes", tmp_path, popsize=5).restore()
    with pytest.raises(EvomergeError, match="seed"):
        make("cmaes", tmp_path, seed=1).restore()


def test_import_stays_light():
    code = "import sys, evomerge.optimize; print(any(m in sys.modules for m in ('optuna', 'cma')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# -- bad input ---------------------------------------------------------------


def test_bad_configuration_errors(tmp_path):
    with pytest.raises(EvomergeError, match="unknown optimizer 'bogus'.*cmaes.*tpe"):
        make("bogus", tmp_path)
    with pytest.raises(EvomergeError, match="unknown setting 'pop_size'; valid: popsize, sigma0"):
        make("cmaes", tmp_path, pop_size=8)
    with pytest.raises(EvomergeError, match="cmaes handles one objective"):
        make("cmaes", tmp_path, directions=["minimize", "maximize"])
    with pytest.raises(EvomergeError, match="optuna_cmaes handles one objective"):
        make("optuna_cmaes", tmp_path, directions=["minimize", "maximize"])
    with pytest.raises(EvomergeError, match="dim must be an integer >= 1"):
        make("random", tmp_path, dim=0)
    with pytest.raises(EvomergeError, match="direction 'up'"):
        make("random", tmp_path, directions=["up"])
    with pytest.raises(EvomergeError, match="popsize must be an integer >= 2"):
        make("cmaes", tmp_path, popsize=1)


def test_bad_tell_errors(tmp_path):
    opt = make("tpe", tmp_path)
    ask = opt.ask()
    with pytest.raises(EvomergeError, match="candidate 7 was never asked"):
        opt.tell(7, [1.0])
    with pytest.raises(EvomergeError, match="got 2 values for 1 objectives"):
        opt.tell(ask.id, [1.0, 2.0])
    with pytest.raises(EvomergeError, match="non-finite"):
        opt.tell(ask.id, [float("nan")])
    opt.tell(ask.id, [1.0])
    with pytest.raises(EvomergeError, match="candidate 0 was already told"):
        opt.tell(ask.id, [1.0])
