"""The search loop end to end on the tiny zoo: journal, resume (kill -9 included), dead workers, export."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evomerge.errors import EvomergeError
from evomerge.run.executor import LocalExecutor, RayExecutor
from evomerge.run.rundir import RunDir
from evomerge.run.runner import Runner
from evomerge.spaces.space import SearchSpace
from search_helpers import comparable, tiny_space

EVOMERGE = [sys.executable, "-m", "evomerge.cli"]


def local(space):
    return LocalExecutor(space.model_dump(mode="json"))


def start(path: Path, run: Path, **overrides) -> RunDir:
    space = SearchSpace.from_file(path).with_overrides(**overrides).resolved()
    return RunDir.create(run, space)


@pytest.fixture(scope="module")
def reference_run(tiny_zoo, tmp_path_factory):
    """An uninterrupted 8-evaluation CMA-ES run, in process."""
    tmp = tmp_path_factory.mktemp("ref")
    run = start(tiny_space(tiny_zoo, tmp, budget=8), tmp / "run")
    progress = Runner(run, local).run()
    return run, progress


def test_journal_holds_every_evaluation_once(reference_run):
    run, progress = reference_run
    journal = run.journal()
    assert [e.id for e in journal] == list(range(8))
    assert progress.done == 8 and progress.failed == 0
    best = max(journal, key=lambda e: e.fitness[0])
    assert progress.best.id == best.id
    for e in journal:
        assert e.status == "ok" and 0.0 <= e.fitness[0] <= 1.0
        assert e.fitness[0] == pytest.approx(sum(e.metrics[f"zoo_{t}/exact_match"] for t in ("copy", "rev", "sort")) / 3)
        assert e.recipe["merge_method"] == "ties" and e.metrics["merge/num_layers"] == 2
    # the search is not a constant: candidates differ and so do their scores
    assert len({round(e.fitness[0], 6) for e in journal}) > 2


def test_interrupted_run_resumes_to_the_same_journal(tiny_zoo, tmp_path, reference_run):
    run = start(tiny_space(tiny_zoo, tmp_path, budget=8), tmp_path / "run")

    def interrupt(progress):
        if progress.done == 3 and progress.workers.get(0, "").startswith("evaluating"):
            raise KeyboardInterrupt  # candidate #3 is asked and in flight

    with pytest.raises(KeyboardInterrupt):
        Runner(run, local, on_event=interrupt).run()
    assert len(run.journal()) == 3
    with open(run.journal_file, "a") as f:
        f.write('{"id": 3, "genes": {"copy.we')  # a torn line, as kill -9 mid-write leaves
    Runner(run, local).run()
    assert comparable(run.journal()) == comparable(reference_run[0].journal())
    assert run.journal_file.read_text().count("\n") == 8  # the torn bytes are gone


def test_resume_with_a_larger_budget_continues(tiny_zoo, tmp_path, reference_run):
    path = tiny_space(tiny_zoo, tmp_path, budget=5)
    run = start(path, tmp_path / "run")
    Runner(run, local).run()
    assert len(run.journal()) == 5
    run.save_space(run.space().with_overrides(budget=8))
    Runner(run, local).run()
    assert comparable(run.journal()) == comparable(reference_run[0].journal())
    assert [e.session for e in run.journal()] == [1] * 5 + [2] * 3


def test_placement_of_the_pool_is_reported_and_changes_no_result(tiny_zoo, tmp_path, reference_run):
    run = start(tiny_space(tiny_zoo, tmp_path, budget=8, placement="disk"), tmp_path / "run")
    progress = Runner(run, local).run()
    assert progress.memory.startswith("placement disk on cpu") and "as requested" in progress.memory
    assert reference_run[1].memory.startswith("placement device on cpu")
    assert comparable(run.journal()) == comparable(reference_run[0].journal())


def test_failed_candidates_are_journaled_and_the_search_goes_on(tiny_zoo, tmp_path):
    plugin = tmp_path / "flaky.py"
    plugin.write_text(
        "import math\n"
        "calls = []\n"
        "def score(model, tokenizer):\n"
        "    calls.append(1)\n"
        "    if len(calls) % 3 == 0:\n"
        "        return {'score': math.nan}\n"
        "    if len(calls) % 4 == 0:\n"
        "        raise RuntimeError('evaluator crashed')\n"
        "    return {'score': float(model.model.embed_tokens.weight.abs().mean())}\n"
    )
    path = tiny_space(tiny_zoo, tmp_path, budget=8, optimizer="tpe",
                      evaluators=[{"type": "python", "function": f"{plugin}:score"}],
                      fitness=[{"name": "score", "direction": "minimize", "metrics": ["score"]}])
    run = start(path, tmp_path / "run")
    progress = Runner(run, local).run()
    journal = run.journal()
    failed = [e for e in journal if not e.ok]
    assert [e.id for e in journal] == list(range(8))
    assert {e.id for e in failed} == {2, 3, 5, 7} and progress.failed == 4
    assert any("is nan" in e.error for e in failed) and any("evaluator crashed" in e.error for e in failed)
    assert all(e.fitness is None for e in failed) and all(e.fitness for e in journal if e.ok)
    # Optuna's storage lives in the run dir and has every candidate as a finished trial
    import optuna

    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(run.optimizer_dir / "optuna.log")))
    trials = optuna.load_study(study_name="evomerge", storage=storage).trials
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 8


def test_dead_worker_is_replaced_and_its_candidate_retried(tiny_zoo, tmp_path):
    marker = tmp_path / "killed-once"
    plugin = tmp_path / "killer.py"
    plugin.write_text(
        "import os, signal\n"
        "from pathlib import Path\n"
        "def score(model, tokenizer, marker):\n"
        "    if not Path(marker).exists():\n"
        "        Path(marker).write_text(str(os.getpid()))\n"
        "        os.kill(os.getpid(), signal.SIGKILL)  # the worker process dies mid-evaluation\n"
        "    return {'score': float(model.lm_head.weight.abs().mean())}\n"
    )
    path = tiny_space(tiny_zoo, tmp_path, budget=6, optimizer="random", workers=2,
                      evaluators=[{"type": "python", "function": f"{plugin}:score", "kwargs": {"marker": str(marker)}}],
                      fitness=[{"name": "score", "direction": "maximize", "metrics": ["score"]}])
    run = start(path, tmp_path / "run")
    progress = Runner(run, lambda s: RayExecutor(s.model_dump(mode="json"), s.workers)).run()
    journal = run.journal()
    assert marker.exists() and progress.retried == 1
    assert sorted(e.id for e in journal) == list(range(6)) and all(e.ok for e in journal)
    assert [e.attempts for e in journal].count(2) == 1


def _run_cli(*args, **kw):
    return subprocess.run([*EVOMERGE, *map(str, args)], capture_output=True, text=True, timeout=300, **kw)


def test_sigkill_mid_run_then_resume_loses_and_repeats_nothing(tiny_zoo, tmp_path, reference_run):
    """The real CLI on a Ray worker, killed with SIGKILL mid-run, resumed: same journal as uninterrupted."""
    space = tiny_space(tiny_zoo, tmp_path, budget=8)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([*EVOMERGE, "search", str(space), "--run-dir", str(run_dir), "--no-export"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    journal = run_dir / "journal.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    proc.wait()
    done_before = journal.read_text().count("\n")
    assert 3 <= done_before < 8
    result = _run_cli("resume", run_dir, "--no-export")
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = RunDir.open(run_dir).journal()
    assert [e.id for e in resumed][:done_before] == list(range(done_before))
    assert sorted(e.id for e in resumed) == list(range(8))
    assert comparable(resumed) == comparable(reference_run[0].journal())


def test_cli_export_loads_in_the_lm_eval_cli(tiny_zoo, tmp_path, reference_run):
    run, _ = reference_run
    out = tmp_path / "export"
    result = _run_cli("export", run.path, out)
    assert result.returncode == 0, result.stderr[-2000:]
    scores = json.loads((out / "scores.json").read_text())
    best = max(run.journal(), key=lambda e: e.fitness[0])
    assert scores["candidate"] == best.id
    from evomerge.recipe import Recipe

    assert Recipe.from_file(out / "recipe.yaml").to_dict() == best.recipe
    results = tmp_path / "lm_eval_out"
    cli = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={out}",
         "--include_path", str(tiny_zoo.tasks_dir), "--tasks", "zoo_copy,zoo_rev,zoo_sort",
         "--batch_size", "16", "--output_path", str(results)],
        capture_output=True, text=True, timeout=300,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    (written,) = results.rglob("results_*.json")
    cli_scores = json.loads(written.read_text())["results"]
    for task in ("zoo_copy", "zoo_rev", "zoo_sort"):
        assert cli_scores[task]["exact_match,none"] == pytest.approx(scores["test"]["metrics"][f"{task}/exact_match"])
    assert "| zoo_copy/exact_match |" in (out / "README.md").read_text()


def test_export_scores_only_what_has_a_test_split(tiny_zoo, tmp_path, reference_run):
    """A file evaluator without test_path is not re-scored as "test"; a task without a test split is
    listed as unscored; neither stops the export."""
    from evomerge.run.export import export_run

    run = RunDir(tmp_path / "run")
    shutil.copytree(reference_run[0].path, run.path, ignore=shutil.ignore_patterns("best", "report"))
    space = run.space()
    evaluators = [*space.objective.evaluators,
                  {"type": "lm_eval", "name": "val_only", "include_path": str(tiny_zoo.tasks_dir),
                   "tasks": ["zoo_rev_val"]},
                  {"type": "entropy", "path": str(tiny_zoo.tasks_dir / "unlabeled.jsonl"), "limit": 4}]
    run.save_space(space.model_copy(update={"objective": space.objective.model_copy(update={"evaluators": evaluators})}))
    (run.optimizer_dir / "space.json").unlink()  # as if the run had started with these evaluators
    scores = export_run(run, tmp_path / "out")
    test = scores["test"]
    assert set(test["unscored"]) == {"val_only", "entropy"}
    assert "no test split" in test["unscored"]["val_only"] and "test_path" in test["unscored"]["entropy"]
    assert "entropy" not in test["metrics"] and "zoo_copy/exact_match" in test["metrics"]
    assert test["fitness"]  # the objective's own metrics were all scored
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Not scored on the test split:" in card and "- val_only: " in card


def test_cli_refuses_an_existing_run_and_resume_needs_one(tiny_zoo, tmp_path, reference_run):
    space = tiny_space(tiny_zoo, tmp_path)
    result = _run_cli("search", space, "--run-dir", reference_run[0].path)
    assert result.returncode == 2 and "already exists (continue it with `evomerge resume" in result.stderr
    (tmp_path / "afile").write_text("x")
    result = _run_cli("search", space, "--run-dir", tmp_path / "afile")
    assert result.returncode == 2 and "afile: is a file, not a directory" in result.stderr
    result = _run_cli("resume", tmp_path / "nothing")
    assert result.returncode == 2 and "nothing: no such run directory" in result.stderr
    result = _run_cli("resume", tmp_path)
    assert result.returncode == 2 and "not a run directory (no config.yaml)" in result.stderr
    result = _run_cli("resume", reference_run[0].path, "--budget", "3")
    assert result.returncode == 2 and "can only grow" in result.stderr


def test_corrupt_journal_line_is_named(tiny_zoo, tmp_path):
    run = start(tiny_space(tiny_zoo, tmp_path, budget=2), tmp_path / "run")
    Runner(run, local).run()
    lines = run.journal_file.read_text().splitlines()
    run.journal_file.write_text("{not json\n" + lines[1] + "\n")
    with pytest.raises(EvomergeError, match=r"journal\.jsonl: line 1 is corrupt"):
        Runner(run, local).run()


def test_staged_search_evolves_a_layer_path_over_the_parameter_winner(tiny_zoo, tmp_path):
    space = tiny_space(tiny_zoo, tmp_path, budget=6, genome={
        "type": "staged", "parameter_budget": 3,
        "parameter": {"type": "parameter", "method": "task_arithmetic"},
        "dataflow": {"type": "dataflow", "repeats": 1, "scales": "slot"},
    })
    run_dir = tmp_path / "run"
    result = _run_cli("search", space, "--run-dir", run_dir, "--local")
    assert result.returncode == 0, result.stderr[-2000:]
    first, second = RunDir(run_dir / "stage1"), RunDir(run_dir / "stage2")
    assert [e.recipe["merge_method"] for e in first.journal()] == ["task_arithmetic"] * 3
    winner = str((first.path / "best").resolve())
    assert second.space().models.sources[0] == winner and second.space().genome.anchor == winner
    journal = second.journal()
    assert [e.id for e in journal] == [0, 1, 2] and all(e.ok for e in journal)
    for e in journal:
        assert e.recipe["merge_method"] == "passthrough"
        assert e.metrics["merge/num_layers"] == len(e.recipe["slices"])
    scores = json.loads((run_dir / "best" / "scores.json").read_text())
    chosen = max(journal, key=lambda e: e.fitness[0])
    assert scores["candidate"] == chosen.id
    assert scores["test"]["metrics"]["merge/num_layers"] == len(chosen.recipe["slices"])
    status = _run_cli("status", run_dir)
    text = " ".join(status.stdout.split())
    assert status.returncode == 0 and "3/3 evaluations" in text and "genome dataflow" in text
    winner = max((e for e in first.journal() if e.ok), key=lambda e: (e.fitness[0], -e.id))
    assert f"stage 1 ({first.path}): 3/3 successful evaluations, winner #{winner.id}" in text
    # the data-flow stage's first candidate is stage 1's winner itself: it scores what the winner scored
    assert journal[0].fitness == max(e.fitness for e in first.journal() if e.ok)
    shutil.rmtree(run_dir / "best")
    text = " ".join(_run_cli("status", run_dir).stdout.split())
    assert f"the search is complete but its best is not exported to {run_dir / 'best'}" in text
    # stage 1's winner is stage 2's source: no export may replace it under stage 2's results
    result = _run_cli("export", first.path, first.path / "best", "--force", "--no-score", "--rank", "2")
    assert result.returncode == 2 and "an input of this command; refusing to replace it" in " ".join(result.stderr.split())


def test_corrupt_optimizer_state_is_rebuilt_from_the_journal(tiny_zoo, tmp_path, reference_run):
    run = start(tiny_space(tiny_zoo, tmp_path, budget=5), tmp_path / "run")
    Runner(run, local).run()
    (run.optimizer_dir / "optimizer.pkl").write_bytes(b"\x80\x04garbage")
    run.save_space(run.space().with_overrides(budget=8))
    Runner(run, local).run()
    assert comparable(run.journal()) == comparable(reference_run[0].journal())
    (aside,) = run.path.glob("optimizer.corrupt-*")
    assert (aside / "optimizer.pkl").read_bytes() == b"\x80\x04garbage"
    # the search as started stays with the run: an edited config is still refused after the rebuild
    assert (run.optimizer_dir / "space.json").read_bytes() == (aside / "space.json").read_bytes()
    run.save_space(run.space().with_overrides(seed=1))
    with pytest.raises(EvomergeError, match="seed was changed after the run started"):
        run.check_unchanged()
    (run.optimizer_dir / "space.json").write_text('{"name":')
    with pytest.raises(EvomergeError, match=r"space\.json: damaged .* Restore it, or delete it"):
        run.check_unchanged()


def test_a_torn_optuna_journal_is_rebuilt_from_the_run_journal(tiny_zoo, tmp_path):
    run = start(tiny_space(tiny_zoo, tmp_path, budget=3, optimizer="tpe"), tmp_path / "run")
    Runner(run, local).run()
    log = run.optimizer_dir / "optuna.log"
    log.write_bytes(log.read_bytes()[:-50])
    run.save_space(run.space().with_overrides(budget=5))
    Runner(run, local).run()
    assert sorted(e.id for e in run.journal()) == [0, 1, 2, 3, 4]
    (aside,) = run.path.glob("optimizer.corrupt-*")
    assert (aside / "optuna.log").exists()


def test_optuna_state_and_journal_out_of_step(tiny_zoo, tmp_path):
    """Either file of Optuna's state missing is rebuilt from the journal into a fresh study (the result is
    the uninterrupted run's); a journal lacking scored candidates is refused."""
    import optuna

    straight = start(tiny_space(tiny_zoo, tmp_path, budget=5, optimizer="tpe"), tmp_path / "straight")
    Runner(straight, local).run()
    first = start(tiny_space(tiny_zoo, tmp_path, budget=3, optimizer="tpe"), tmp_path / "first")
    Runner(first, local).run()
    for lost in ("optimizer.pkl", "optuna.log"):
        run = RunDir(tmp_path / lost)
        shutil.copytree(first.path, run.path)
        (run.optimizer_dir / lost).unlink()
        run.save_space(run.space().with_overrides(budget=5))
        Runner(run, local).run()
        assert comparable(run.journal()) == comparable(straight.journal()), lost
        study = optuna.load_study(study_name="evomerge", storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(run.optimizer_dir / "optuna.log"))))
        assert len(study.trials) == 5  # one history, not the old trials plus a replay of them
    run = RunDir(tmp_path / "truncated")
    shutil.copytree(first.path, run.path)
    run.journal_file.write_text("".join(run.journal_file.read_text().splitlines(keepends=True)[:1]))
    with pytest.raises(EvomergeError, match=r"candidates #1, #2 were scored .* but are not in the journal"):
        Runner(run, local).run()


def test_bad_settings_fail_before_a_run_dir_is_left_behind(tiny_zoo, tmp_path):
    run_dir = tmp_path / "run"
    result = _run_cli("search", tiny_space(tiny_zoo, tmp_path, optimizer="hillclimb"), "--run-dir", run_dir)
    assert result.returncode == 2 and not run_dir.exists()
    assert "tiny.yaml: optimizer: unknown optimizer 'hillclimb'" in " ".join(result.stderr.split())
    space = tiny_space(tiny_zoo, tmp_path, name="badtask", evaluators=[
        {"type": "lm_eval", "include_path": str(tiny_zoo.tasks_dir), "tasks": ["zoo_nope"]}])
    result = _run_cli("search", space, "--run-dir", run_dir, "--local")
    assert result.returncode == 2 and "objective.evaluators[0]: lm_eval: unknown task 'zoo_nope'" in result.stderr and not run_dir.exists()
    result = _run_cli("search", space, "--budget", "0")
    assert result.returncode == 2 and "invalid override: budget: Input should be greater than 0" in result.stderr
    result = _run_cli("search", tiny_space(tiny_zoo, tmp_path), "--run-dir", run_dir, "--local", "--address", "h:1")
    assert result.returncode == 2 and not run_dir.exists()
    assert "--address h:1 names a Ray cluster, but --local evaluates in this process" in " ".join(result.stderr.split())
    result = _run_cli("search", tiny_space(tiny_zoo, tmp_path), "--run-dir", run_dir, "--address", "127.0.0.1:1")
    assert result.returncode == 2 and not run_dir.exists()
    assert "--address 127.0.0.1:1: no Ray cluster answers there" in " ".join(result.stderr.split())
    # metrics that every candidate would miss or report twice: known once the evaluators are set up
    lm_eval = {"type": "lm_eval", "include_path": str(tiny_zoo.tasks_dir), "tasks": ["zoo_rev"], "limit": 4}
    space = tiny_space(tiny_zoo, tmp_path, name="badmetric", evaluators=[lm_eval], fitness=[
        {"name": "acc", "direction": "maximize", "metrics": ["zoo_rev/accuracy"]}])
    result = _run_cli("search", space, "--run-dir", run_dir, "--local")
    assert result.returncode == 2 and not run_dir.exists()
    assert ("objective: fitness 'acc' needs metric 'zoo_rev/accuracy', which no evaluator reports; they report: "
            "merge/num_layers, zoo_rev/exact_match") in " ".join(result.stderr.split())
    entropy = {"type": "entropy", "path": str(tiny_zoo.tasks_dir / "unlabeled.jsonl"), "limit": 4}
    space = tiny_space(tiny_zoo, tmp_path, name="twice", evaluators=[entropy, entropy], fitness=[
        {"name": "entropy", "direction": "minimize", "metrics": ["entropy"]}])
    result = _run_cli("search", space, "--run-dir", run_dir, "--local")
    assert result.returncode == 2 and not run_dir.exists()
    assert ("objective.evaluators[1] reports metric 'entropy', as objective.evaluators[0] does; give it a name:"
            in " ".join(result.stderr.split()))


def test_one_process_searches_a_run_and_export_force_spares_it(reference_run, tmp_path):
    """A second search/resume of a run in use is refused (two writers would journal ids twice); export
    --force never replaces the run directory or a folder holding it."""
    run, _ = reference_run
    before = run.journal_file.read_bytes()
    with run.lock():
        assert run.busy
        second = _run_cli("resume", run.path, "--local", "--no-export")
    assert second.returncode == 2 and "another evomerge process is searching in this run" in second.stderr
    assert not run.busy  # released when the holder ends
    for out in (run.path, run.path.parent):
        result = _run_cli("export", run.path, out, "--force", "--no-score")
        assert result.returncode == 2 and f"holds {run.path}, an input" in " ".join(result.stderr.split())
    assert run.journal_file.read_bytes() == before and (run.path / "config.yaml").exists()


def test_a_search_whose_every_candidate_fails_exits_with_the_error(tiny_zoo, tmp_path):
    plugin = tmp_path / "broken_metric.py"
    plugin.write_text("def score(model, tokenizer):\n    return {'x': 'high'}\n")
    space = tiny_space(tiny_zoo, tmp_path, budget=2, optimizer="random",
                       evaluators=[{"type": "python", "function": f"{plugin}:score"}],
                       fitness=[{"name": "x", "direction": "maximize", "metrics": ["x"]}])
    result = _run_cli("search", space, "--run-dir", tmp_path / "run", "--local", "--no-export")
    message = " ".join(result.stderr.split())
    assert result.returncode == 2 and "all 2 candidates failed; the last with:" in message
    assert "metric 'x' is not a number" in message
    assert len(RunDir.open(tmp_path / "run").journal()) == 2  # the failures stay journaled
    # the same failure over and over is a misconfiguration: the run stops instead of spending its budget
    many = tiny_space(tiny_zoo, tmp_path, name="many", budget=20, optimizer="random",
                      evaluators=[{"type": "python", "function": f"{plugin}:score"}],
                      fitness=[{"name": "x", "direction": "maximize", "metrics": ["x"]}])
    result = _run_cli("search", many, "--run-dir", tmp_path / "many", "--local", "--no-export")
    message = " ".join(result.stderr.split())
    assert result.returncode == 2 and "the first 5 candidates all failed with the same error" in message
    assert len(RunDir.open(tmp_path / "many").journal()) == 5


def test_resume_refuses_a_config_edited_since_the_start(tiny_zoo, tmp_path):
    run = start(tiny_space(tiny_zoo, tmp_path, budget=4), tmp_path / "run")
    run.save_space(run.space().with_overrides(budget=9, workers=2))  # what resume may change
    run.check_unchanged()
    edited = run.config_file.read_text().replace("method: ties", "method: dare_ties")
    assert edited != run.config_file.read_text()
    run.config_file.write_text(edited)
    with pytest.raises(EvomergeError, match=r"config.yaml: genome.method was changed after the run started"):
        run.check_unchanged()
    result = _run_cli("resume", run.path, "--local", "--no-export")
    assert result.returncode == 2 and "genome.method was changed" in result.stderr
    assert not run.journal_file.exists()


def test_a_budget_edited_below_the_evaluations_done_is_refused(reference_run, tmp_path):
    run = RunDir(tmp_path / "run")
    shutil.copytree(reference_run[0].path, run.path)
    run.save_space(run.space().with_overrides(budget=5))
    with pytest.raises(EvomergeError, match=r"config.yaml: budget 5 is below the 8 evaluations this run has done"):
        run.check_unchanged()


def test_a_full_disk_names_the_file_it_could_not_write(tmp_path, monkeypatch, reference_run):
    import errno

    from evomerge.fsutil import write_bytes_atomic

    run = RunDir(tmp_path / "run")
    shutil.copytree(reference_run[0].path, run.path)
    before = run.journal_file.read_bytes()

    def full(fd):  # what fsync raises on a full disk: an OSError that names no file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as info:
        run.append(run.journal()[0])
    assert info.value.filename == str(run.journal_file) and info.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as info:
        write_bytes_atomic(run.optimizer_dir / "optimizer.pkl", b"new state")
    assert info.value.filename == str(run.optimizer_dir / "optimizer.pkl")
    assert not list(run.optimizer_dir.glob(".optimizer.pkl.*"))  # no temp file left behind
    assert run.journal_file.read_bytes().startswith(before)
