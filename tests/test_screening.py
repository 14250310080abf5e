"""Surrogate screening in the search loop on the tiny zoo, and its pure decision rules."""

from __future__ import annotations

import pytest

from evomerge.run.executor import LocalExecutor
from evomerge.run.export import choose
from evomerge.run.rundir import RunDir
from evomerge.run.runner import Runner
from evomerge.run.screening import estimate, split_batch
from evomerge.spaces.space import SearchSpace
from search_helpers import tiny_space


def local(space):
    return LocalExecutor(space.model_dump(mode="json"))


def screened_space(zoo, tmp_path, budget=6, **surrogate):
    return tiny_space(zoo, tmp_path, budget=budget, optimizer="tpe", surrogate={
        "evaluators": [{"type": "entropy", "path": str(zoo.tasks_dir / "unlabeled.jsonl")}],
        "metrics": ["entropy"], "direction": "minimize", "keep": 0.5, "batch": 4, **surrogate,
    })


def test_split_batch_keeps_the_best_fraction():
    scores = {0: 0.9, 1: 0.1, 2: 0.5, 3: 0.3, 4: 0.7}
    assert split_batch(scores, 0.5, "minimize", limit=10) == ([1, 3, 2], [4, 0])
    assert split_batch(scores, 0.4, "maximize", limit=10) == ([0, 4], [2, 3, 1])
    assert split_batch(scores, 0.5, "minimize", limit=1) == ([1], [3, 2, 4, 0])
    assert split_batch(scores, 0.01, "minimize", limit=10)[0] == [1]


def test_estimate_never_beats_the_batch_it_was_screened_from():
    batch = [[0.6], [0.4]]
    # too little history: the worst kept value of the batch
    assert estimate(2.0, [(1.0, [0.5])], batch, ["maximize"]) == [0.4]
    # a fitted line that predicts worse than the cap is used as is ...
    history = [(0.0, [0.9]), (1.0, [0.5]), (2.0, [0.1])]
    assert estimate(2.5, history, batch, ["maximize"]) == [pytest.approx(-0.1)]
    # ... and one that predicts better is capped
    assert estimate(0.0, history, batch, ["maximize"]) == [0.4]
    assert estimate(0.0, [(0.0, [1.0]), (1.0, [2.0]), (2.0, [3.0])], [[1.5], [2.5]], ["minimize"]) == [2.5]


def test_screened_search_journals_both_scores_and_spends_the_budget_on_full_evaluations(tiny_zoo, tmp_path):
    space = SearchSpace.from_file(screened_space(tiny_zoo, tmp_path)).resolved()
    run = RunDir.create(tmp_path / "run", space)
    progress = Runner(run, local).run()
    journal = run.journal()
    full = [e for e in journal if not e.screened]
    screened = [e for e in journal if e.screened]
    assert len(full) == 6 == progress.done and len(screened) == progress.screened >= 4
    assert all(e.surrogate is not None for e in journal)
    assert all(e.status == "ok" and "zoo_copy/exact_match" in e.metrics for e in full)
    assert all(not e.metrics for e in screened)  # never evaluated fully: no objective metrics
    # batches of 4 asked in id order: the kept half had the lower entropy, screened ones were told no more
    # than the worst full evaluation of their batch
    for start in range(0, max(e.id for e in journal) + 1, 4):
        batch = [e for e in journal if start <= e.id < start + 4]
        kept = [e for e in batch if not e.screened]
        for s in (e for e in batch if e.screened):
            assert all(s.surrogate >= k.surrogate for k in kept)
            assert s.fitness[0] <= min(k.fitness[0] for k in kept) + 1e-12
    assert not choose(run).screened and progress.best.id == choose(run).id


def test_screened_search_resumes_with_a_larger_budget(tiny_zoo, tmp_path):
    space = SearchSpace.from_file(screened_space(tiny_zoo, tmp_path, budget=2)).resolved()
    run = RunDir.create(tmp_path / "run", space)
    Runner(run, local).run()
    first = run.journal()
    run.save_space(run.space().with_overrides(budget=4))
    Runner(run, local).run()
    journal = run.journal()
    assert journal[: len(first)] == first
    assert sum(not e.screened for e in journal) == 4
    assert sorted(e.id for e in journal) == list(range(len(journal)))


def test_bad_surrogate_settings_are_named(tiny_zoo, tmp_path):
    from evomerge.errors import EvomergeError

    with pytest.raises(EvomergeError, match=r"line \d+: surrogate.keep: Input should be greater than 0"):
        SearchSpace.from_file(screened_space(tiny_zoo, tmp_path, keep=0))
    space = SearchSpace.from_file(screened_space(tiny_zoo, tmp_path, evaluators=[{"type": "entropy"}])).resolved()
    with pytest.raises(EvomergeError, match="evaluator entropy: missing setting 'path'"):
        space.check()


def test_candidates_failing_their_probe_spend_no_budget(tiny_zoo, tmp_path):
    from evomerge.errors import EvomergeError

    plugin = tmp_path / "probe.py"
    plugin.write_text("calls = [0]\n"
                      "def flaky(model, tokenizer):\n"
                      "    calls[0] += 1\n"
                      "    if calls[0] % 2 == 0:\n"
                      "        raise RuntimeError(f'probe {calls[0]}')\n"
                      "    return {'s': float(calls[0])}\n"
                      "def broken(model, tokenizer):\n"
                      "    calls[0] += 1\n"
                      "    raise RuntimeError(f'probe {calls[0]}')\n")

    def space(fn: str, name: str):
        path = screened_space(tiny_zoo, tmp_path, budget=3, batch=2, metrics=["s"],
                              evaluators=[{"type": "python", "function": f"{plugin}:{fn}"}])
        return RunDir.create(tmp_path / name, SearchSpace.from_file(path).resolved())

    run = space("flaky", "flaky")
    progress = Runner(run, local).run()
    journal = run.journal()
    failed = [e for e in journal if not e.ok]
    assert failed and all(e.screened and e.error.startswith("surrogate: python: RuntimeError: probe") for e in failed)
    assert sum(not e.screened for e in journal) == 3 == progress.done  # exactly the budget, never more
    # a surrogate that never scores (each message differs, so no fail-fast): stopped once a budget's worth failed
    with pytest.raises(EvomergeError, match="the last 4 candidates all failed before their full evaluation"):
        Runner(space("broken", "broken"), local).run()
