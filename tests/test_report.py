"""`evomerge report` on real tiny runs: each plot is made where it applies, the summary's numbers are the journal's."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from search_helpers import tiny_space

from evomerge.errors import EvomergeError
from evomerge.report.build import write_report
from evomerge.report.series import (
    best_so_far,
    layer_path,
    parameter_layers,
    pareto_mask,
    wall_clock,
)
from evomerge.report.summary import number
from evomerge.run.executor import LocalExecutor
from evomerge.run.rundir import RunDir
from evomerge.run.runner import Runner
from evomerge.spaces.space import SearchSpace

EVOMERGE = [sys.executable, "-m", "evomerge.cli"]


def local(space):
    return LocalExecutor(space.model_dump(mode="json"))


def _evaluators(zoo):
    # one task, few items: the report needs real journals, not good merges
    return [{"type": "lm_eval", "include_path": str(zoo.tasks_dir), "tasks": ["zoo_copy"], "limit": 8,
             "batch_size": 8}]


def _fitness(*extra):
    return [{"name": "exact_match", "direction": "maximize", "metrics": ["zoo_copy/exact_match"]}, *extra]


def _search(zoo, tmp: Path, name: str, fitness: list | None = None, **space) -> RunDir:
    path = tiny_space(zoo, tmp, name=name, evaluators=_evaluators(zoo), fitness=fitness or _fitness(), **space)
    run = RunDir.create(tmp / name, SearchSpace.from_file(path).resolved())
    Runner(run, local).run()
    return run


@pytest.fixture(scope="module")
def runs(tiny_zoo, tmp_path_factory):
    """Three real searches on the tiny zoo: per-layer TIES, multi-objective data-flow (NSGA-II), screened."""
    tmp = tmp_path_factory.mktemp("runs")
    parameter = _search(tiny_zoo, tmp, "ties", budget=5, genome={
        "type": "parameter", "method": "ties", "layer_groups": 2, "parameters": {"normalize": False}})
    dataflow = _search(tiny_zoo, tmp, "dfs", budget=6, optimizer="nsga2",
                       genome={"type": "dataflow", "repeats": 1, "scales": "pair"},
                       fitness=_fitness({"name": "layers", "direction": "minimize", "metrics": ["merge/num_layers"]}))
    screened = _search(tiny_zoo, tmp, "screened", budget=3, optimizer="tpe", surrogate={
        "evaluators": [{"type": "entropy", "path": str(tiny_zoo.tasks_dir / "unlabeled.jsonl"), "limit": 8}],
        "metrics": ["entropy"], "direction": "minimize", "keep": 0.5, "batch": 4})
    return {"parameter": parameter, "dataflow": dataflow, "screened": screened}


def _fingerprint(run: RunDir) -> dict[str, str]:
    """Hash of every file of a run outside report/."""
    return {str(f.relative_to(run.path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(run.path.rglob("*")) if f.is_file() and "report" not in f.relative_to(run.path).parts}


@pytest.fixture(scope="module")
def reports(runs):
    """Each run's own report (in RUN/report/), with the run's files hashed before and after."""
    out = {}
    for kind, run in runs.items():
        before = _fingerprint(run)
        report = write_report([run.path])
        assert _fingerprint(run) == before  # the report never touches the run's own files
        out[kind] = report
    return out


def _png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(path).shape[0] > 100


def _made(report) -> set[str]:
    files = {p.name for p in report.out.iterdir()}
    for name in files - {"summary.md"}:
        _png(report.out / name)
    return files


def _overview_row(out: Path, label: str) -> list[str]:
    """The cells of ``label``'s row in the summary's overview table."""
    for line in (out / "summary.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == label:
            return cells
    raise AssertionError(f"no overview row for {label}")


def _expected_row(run: RunDir) -> list[str]:
    """The overview row computed straight from the journal file, independently of the report code."""
    lines = [json.loads(line) for line in run.journal_file.read_text().splitlines()]
    full = [e for e in lines if not e.get("screened")]
    ok = [e for e in full if e["status"] == "ok"]
    best = max(ok, key=lambda e: (e["fitness"][0], -e["id"]))
    counts = [str(sum(e["status"] == s for e in full)) for s in ("ok", "failed", "oom")]
    return [f"{len(full)}/{run.space().budget}", *counts, str(len(lines) - len(full)),
            f"{run.space().objective.names[0]} {number(best['fitness'][0])} (#{best['id']})"]


def test_parameter_run_report(runs, reports):
    run, report = runs["parameter"], reports["parameter"]
    assert report.out == run.path / "report"
    assert _made(report) == {"summary.md", "progress.png", "parameters.png", "workers.png"}
    assert _overview_row(report.out, "ties")[3:9] == _expected_row(run)
    text = (report.out / "summary.md").read_text()
    assert "evaluations/min, worker utilization" in text and "unreadable" not in text
    # the heatmap's cells are the best candidate's genes: source × layer group (2 groups over the 2 layers)
    best = report.runs[0].best
    labels, weights = parameter_layers(best.recipe, best.genes, 2)["weight"]
    assert labels == ["copy", "rev", "sort"]
    for row, label in enumerate(labels):
        assert weights[row].tolist() == [best.genes[f"{label}.weight[g{g}]"] for g in (0, 1)]


def test_dataflow_multi_objective_report(runs, reports):
    run, report = runs["dataflow"], reports["dataflow"]
    assert _made(report) == {"summary.md", "progress.png", "layer-path.png", "pareto.png", "workers.png"}
    assert _overview_row(report.out, "dfs")[3:9] == _expected_row(run)
    # the plotted path is the genome's own decoding of the best candidate
    best = report.runs[0].best
    genome = run.space().build_genome()
    want = [(m.rsplit("/", 1)[-1], layer, pytest.approx(scale)) for _, m, layer, scale in genome.path(best.x)]
    assert [(s.model, s.layer, s.scale) for s in layer_path(best, run.space().genome)] == want
    # the Pareto front in the summary is the brute-force non-dominated set
    ok = [e for e in run.journal() if e.ok]
    front = {e.id for e in ok if not any(
        o.fitness[0] >= e.fitness[0] and o.fitness[1] <= e.fitness[1] and o.fitness != e.fitness for o in ok)}
    line = next(x for x in (report.out / "summary.md").read_text().splitlines() if x.startswith("- Pareto front"))
    assert line.startswith(f"- Pareto front: {len(front)} of {len(ok)} successful evaluations")
    assert {int(t.split(" ")[0]) for t in line.split("#")[1:]} == front


def test_screened_run_report(runs, reports):
    run, report = runs["screened"], reports["screened"]
    assert _made(report) == {"summary.md", "progress.png", "parameters.png", "workers.png", "surrogate.png"}
    journal = run.journal()
    assert any(e.screened for e in journal) and all(e.started and e.finished for e in journal)
    assert _overview_row(report.out, "screened")[3:9] == _expected_row(run)
    assert "- surrogate: rank correlation with exact_match" in (report.out / "summary.md").read_text()


def test_runs_are_overlaid_and_a_report_is_replaced_whole(runs, tmp_path):
    out = tmp_path / "compare"
    report = write_report([runs["parameter"].path, runs["dataflow"].path], out)
    assert _made(report) == {"summary.md", "progress.png", "parameters-ties.png", "workers-ties.png",
                             "layer-path-dfs.png", "pareto-dfs.png", "workers-dfs.png"}
    write_report([runs["parameter"].path], out)  # an older report is replaced, not merged
    assert _made(report) == {"summary.md", "progress.png", "parameters.png", "workers.png"}
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    with pytest.raises(EvomergeError, match="is not an evomerge report"):
        write_report([runs["parameter"].path], other)
    assert [p.name for p in other.iterdir()] == ["mine.txt"]
    # a summary.md does not make a folder a report: the user's other files would go with it
    (other / "summary.md").write_text("# my notes")
    with pytest.raises(EvomergeError, match="is not an evomerge report"):
        write_report([runs["parameter"].path], other)
    (out / "my-notes.md").write_text("keep")  # nor does a report the user added files to
    with pytest.raises(EvomergeError, match="is not an evomerge report"):
        write_report([runs["parameter"].path], out)
    assert sorted(p.name for p in other.iterdir()) == ["mine.txt", "summary.md"] and (out / "my-notes.md").exists()


def test_status_of_a_multi_objective_run_marks_its_pareto_front(runs):
    run = runs["dataflow"]
    result = subprocess.run([*EVOMERGE, "status", str(run.path), "--top", "99"], capture_output=True, text=True,
                            timeout=120, check=False)
    text = " ".join(result.stdout.split())
    # ties on the first objective go to the second (fewer layers), then to the earlier id
    ok = sorted((e for e in run.journal() if e.ok and not e.screened), key=lambda e: (-e.fitness[0], e.fitness[1], e.id))
    mask = pareto_mask([e.fitness for e in ok], ["maximize", "minimize"])
    front = [f"#{e.id} (rank {rank})" for rank, (e, on) in enumerate(zip(ok, mask), 1) if on]
    assert mask[0]  # the best is on the front
    assert result.returncode == 0
    assert f"best {len(ok)} by exact_match, then layers (validation); ✓ = on the Pareto front" in text
    assert f"Pareto front ({len(front)}): {', '.join(front)}" in text


def test_status_says_whether_a_search_is_running(runs):
    from typer.testing import CliRunner

    from evomerge.cli import app

    run = runs["parameter"]
    idle = CliRunner().invoke(app, ["status", str(run.path)])
    assert idle.exit_code == 0 and "no search running" in " ".join(idle.output.split())
    with run.lock():  # as a search holds it
        busy = CliRunner().invoke(app, ["status", str(run.path)])
    assert busy.exit_code == 0 and "a search is running in it now" in " ".join(busy.output.split())


def test_the_best_of_several_objectives_is_on_the_pareto_front():
    from evomerge.run.rundir import Evaluation
    from evomerge.run.runner import better, ranked

    def ev(i, *fitness, status="ok"):
        return Evaluation(id=i, genes={}, x=[], recipe={}, metrics={}, fitness=list(fitness), status=status)

    # #0 ties #3 on accuracy and loses on layers: ranking by the first objective alone put #0 first
    evaluations = [ev(0, 0.5, 8), ev(1, 0.4, 2), ev(2, 0.9, 9, status="failed"), ev(3, 0.5, 4), ev(4, 0.5, 4)]
    best = ranked(evaluations, ["maximize", "minimize"])
    assert [e.id for e in best] == [3, 4, 0, 1]
    assert pareto_mask([e.fitness for e in best], ["maximize", "minimize"])[0]
    assert better(evaluations[3], evaluations[0], ["maximize", "minimize"])
    assert not better(evaluations[4], evaluations[3], ["maximize", "minimize"])  # equal: the earlier id stays


def test_runs_with_different_objectives_plot_each_on_its_own_axis(runs, tiny_zoo, tmp_path, monkeypatch):
    from evomerge.report import plots

    layers = _search(tiny_zoo, tmp_path, "layers", budget=2, genome={"type": "parameter", "method": "ties"},
                     fitness=[{"name": "layers", "direction": "minimize", "metrics": ["merge/num_layers"]}])
    figures = {}
    real = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, file: figures.update({file.name: fig}) or real(fig, file))
    write_report([runs["parameter"].path, layers.path, runs["dataflow"].path], tmp_path / "compare")
    axes = [ax for ax in figures["progress.png"].axes if ax.get_xlabel() == "full evaluation"]
    assert [ax.get_ylabel() for ax in axes] == ["exact_match", "layers"]
    # per row, the runs that have that objective: a curve (step line) each
    assert [sorted(line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_"))
            for ax in axes] == [["dfs", "ties"], ["dfs", "layers"]]
    # an objective named like another but defined otherwise (here: another metric) gets a row of its own
    other = _search(tiny_zoo, tmp_path, "other", budget=2, genome={"type": "parameter", "method": "ties"},
                    fitness=[{"name": "exact_match", "direction": "maximize", "metrics": ["zoo_copy/exact_match"],
                              "aggregate": "sum"}])
    write_report([runs["parameter"].path, other.path], tmp_path / "clash")
    axes = [ax for ax in figures["progress.png"].axes if ax.get_xlabel() == "full evaluation"]
    assert [ax.get_ylabel() for ax in axes] == ["exact_match (ties)", "exact_match (other)"]


def test_journal_without_times_still_reports(runs, tmp_path):
    """Journals written before start/finish times were recorded: no wall-time plots, numbers still right."""
    run = RunDir(tmp_path / "old")
    shutil.copytree(runs["parameter"].path, run.path, ignore=shutil.ignore_patterns("report"))
    lines = [json.loads(x) for x in run.journal_file.read_text().splitlines()]
    run.journal_file.write_text("".join(json.dumps({k: v for k, v in e.items() if k not in ("started", "finished")})
                                        + "\n" for e in lines))
    report = write_report([run.path])
    assert _made(report) == {"summary.md", "progress.png", "parameters.png"}
    row = _overview_row(report.out, "old")
    assert row[3:9] == _expected_row(run) and row[9:] == ["—", "—"]
    assert "wall time: unknown" in (report.out / "summary.md").read_text()


def test_corrupt_lines_are_skipped_and_counted(runs, tmp_path):
    run = RunDir(tmp_path / "damaged")
    shutil.copytree(runs["parameter"].path, run.path, ignore=shutil.ignore_patterns("report"))
    lines = run.journal_file.read_text().splitlines()
    # valid JSON of the wrong shape counts as unreadable too: a word for a fitness, genes that are not a
    # mapping, a start time that is not a number, a NaN fitness (which would rank first or last at random)
    # and so does a fitness with another number of objectives than the run's, and a repeated candidate id
    second = json.loads(lines[1])
    wrong = [json.dumps({**second, **change}) for change in
             ({"fitness": ["abc"]}, {"genes": "x"}, {"started": "yesterday"}, {"fitness": [float("nan")]},
              {"fitness": [0.9, 4.0]}, {"id": json.loads(lines[0])["id"], "fitness": [1.0]})]
    run.journal_file.write_text("\n".join([lines[0], "{not json", *lines[2:], *wrong, '{"id": 99, "genes"']))
    result = subprocess.run([*EVOMERGE, "report", str(run.path)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipped 8 unreadable line(s)" in result.stderr and "lines 2, 6, 7, 8, 9 and 3 more" in result.stderr
    assert result.stdout.strip() == str(run.path / "report" / "summary.md")
    text = (run.path / "report" / "summary.md").read_text()
    assert "skipped 8 unreadable line(s) (lines 2, 6, 7, 8, 9 and 3 more)" in text
    readable = [json.loads(x) for i, x in enumerate(lines) if i != 1]
    ok = [e for e in readable if e["status"] == "ok"]
    best = max(ok, key=lambda e: (e["fitness"][0], -e["id"]))
    assert _overview_row(run.path / "report", "damaged")[3:9] == [
        f"{len(readable)}/5", str(len(ok)), "0", "0", "0", f"exact_match {number(best['fitness'][0])} (#{best['id']})"]
    status = subprocess.run([*EVOMERGE, "status", str(run.path)], capture_output=True, text=True, timeout=120, check=False)
    assert status.returncode == 0 and "skipped 8 unreadable journal line(s)" in " ".join(status.stderr.split())
    # export reads it the same way, and says so: the best readable candidate
    export = subprocess.run([*EVOMERGE, "export", str(run.path), str(tmp_path / "out"), "--no-score"],
                            capture_output=True, text=True, timeout=300, check=False)
    assert export.returncode == 0, export.stderr[-2000:]
    assert "skipped 8 unreadable journal line(s)" in " ".join(export.stderr.split())
    assert json.loads((tmp_path / "out" / "scores.json").read_text())["candidate"] == best["id"]
    # resume refuses the repeated id, naming both lines
    run.journal_file.write_text("\n".join([*lines, wrong[-1]]) + "\n")
    with pytest.raises(EvomergeError, match=rf"line {len(lines) + 1} repeats candidate #{json.loads(lines[0])['id']} of line 1"):
        run.journal()


def test_a_config_edited_after_the_start_is_refused_by_every_view(runs, tmp_path):
    """status, report and export rank with the frozen objective, as resume does: an edit is one message."""
    run = RunDir(tmp_path / "edited")
    shutil.copytree(runs["parameter"].path, run.path, ignore=shutil.ignore_patterns("report"))
    run.config_file.write_text(run.config_file.read_text().replace("direction: maximize", "direction: minimize"))
    for args in (["status", run.path], ["report", run.path], ["export", run.path, tmp_path / "out"],
                 ["resume", run.path]):
        result = subprocess.run([*EVOMERGE, *map(str, args)], capture_output=True, text=True, timeout=120, check=False)
        text = " ".join(result.stderr.split())
        assert result.returncode == 2 and "Traceback" not in result.stderr, (args, result.stderr[-2000:])
        assert "objective.fitness was changed after the run started" in text, (args, text)
    assert not (tmp_path / "out").exists() and not (run.path / "report").exists()


def test_export_by_id_takes_any_journaled_candidate(runs, tmp_path):
    run = RunDir(tmp_path / "byid")
    shutil.copytree(runs["parameter"].path, run.path, ignore=shutil.ignore_patterns("report"))
    lines = [json.loads(x) for x in run.journal_file.read_text().splitlines()]
    lines[1] |= {"status": "failed", "fitness": None, "error": "out of patience"}
    run.journal_file.write_text("".join(json.dumps(e) + "\n" for e in lines))

    def export(out, *args):
        return subprocess.run([*EVOMERGE, "export", str(run.path), str(tmp_path / out), "--no-score", *args],
                              capture_output=True, text=True, timeout=300, check=False)

    ok = sorted((e for e in lines if e["status"] == "ok"), key=lambda e: (-e["fitness"][0], e["id"]))
    result = export("ok", "--id", str(ok[-1]["id"]))
    scores = json.loads((tmp_path / "ok" / "scores.json").read_text())
    assert result.returncode == 0 and scores["candidate"] == ok[-1]["id"] and scores["rank"] == len(ok)
    assert "status" not in scores and scores["validation"]["fitness"] == {"exact_match": ok[-1]["fitness"][0]}
    result = export("failed", "--id", str(lines[1]["id"]))
    text = " ".join(result.stderr.split())
    scores = json.loads((tmp_path / "failed" / "scores.json").read_text())
    assert result.returncode == 0 and f"candidate #{lines[1]['id']} has no score from the search (failed)" in text
    assert scores["status"] == "failed" and scores["rank"] is None and "fitness" not in scores["validation"]
    assert "In the search: failed (out of patience); no validation score." in (tmp_path / "failed" / "README.md").read_text()
    for args, message in ((["--id", "99"], "has journaled no candidate #99"),
                          (["--id", "0", "--rank", "1"], "give --rank or --id, not both")):
        result = export("bad", *args)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
        assert not (tmp_path / "bad").exists()


def test_bad_input_is_one_clear_message(runs, tmp_path):
    def report(*args):
        return subprocess.run([*EVOMERGE, "report", *map(str, args)], capture_output=True, text=True, timeout=120, check=False)

    result = report(tmp_path)
    assert result.returncode == 2 and "not a run directory" in result.stderr and "Traceback" not in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(runs["parameter"].config_file, empty / "config.yaml")
    (empty / "journal.jsonl").write_text("")
    result = report(empty)
    assert result.returncode == 2 and "no evaluations journaled yet" in result.stderr
    assert "Traceback" not in result.stderr and not (empty / "report").exists()
    (empty / "journal.jsonl").write_text("garbage\n")
    with pytest.raises(EvomergeError, match=r"no evaluations journaled yet \(1 unreadable line\(s\) skipped\)"):
        write_report([empty])


def test_best_so_far_and_pareto_mask():
    assert best_so_far([0.2, None, 0.1, 0.5, 0.3], "maximize") == [0.2, 0.2, 0.2, 0.5, 0.5]
    assert best_so_far([None, 3.0, 4.0, 1.0], "minimize") == [None, 3.0, 3.0, 1.0]
    points = [[0.9, 5], [0.8, 3], [0.7, 4], [0.9, 6], [0.5, 1]]
    assert pareto_mask(points, ["maximize", "minimize"]) == [True, True, False, False, True]
    assert np.array(pareto_mask([], ["maximize", "minimize"])).size == 0


def test_pauses_between_sessions_are_left_out_of_the_wall_clock(runs, tmp_path):
    """A run resumed an hour after it stopped: rates and utilization count the sessions, not the pause."""
    run = RunDir(tmp_path / "resumed")
    shutil.copytree(runs["parameter"].path, run.path, ignore=shutil.ignore_patterns("report"))
    lines = [json.loads(x) for x in run.journal_file.read_text().splitlines()]
    first, second = lines[:3], lines[3:]
    for e in second:
        e["started"] += 3600.0
        e["finished"] += 3600.0
        e["session"] = 2
    run.journal_file.write_text("".join(json.dumps(e) + "\n" for e in lines))
    clock = wall_clock(run.journal())
    spans = [(min(e["started"] for e in s), max(e["finished"] for e in s)) for s in (first, second)]
    assert clock.pauses == ((spans[0][1], spans[1][0]),)
    assert clock.seconds == pytest.approx(sum(b - a for a, b in spans))
    t = second[0]["started"]
    assert clock.elapsed(t) == pytest.approx(t - spans[0][0] - (spans[1][0] - spans[0][1]))
    busy = sum(e["finished"] - e["started"] for e in lines)
    assert clock.utilization == pytest.approx(busy / clock.seconds)  # one worker
    assert clock.utilization > 0.5  # counted over the hour's pause it would be under 1%
    report = write_report([run.path])
    text = (report.out / "summary.md").read_text()
    assert "over 2 sessions" in text and "between them left out" in text
    _png(report.out / "workers.png")


def test_staged_run_reports_both_stages(tiny_zoo, runs, tmp_path):
    """A staged run directory stands for its stages (here real stage runs copied under a staged config)."""
    space = tiny_space(tiny_zoo, tmp_path, name="staged", evaluators=_evaluators(tiny_zoo), fitness=_fitness(), genome={
        "type": "staged", "parameter_budget": 5,
        "parameter": {"type": "parameter", "method": "ties"},
        "dataflow": {"type": "dataflow", "repeats": 1}})
    top = RunDir.create(tmp_path / "staged", SearchSpace.from_file(space).resolved())
    shutil.copytree(runs["parameter"].path, top.path / "stage1", ignore=shutil.ignore_patterns("report"))
    shutil.copytree(runs["dataflow"].path, top.path / "stage2", ignore=shutil.ignore_patterns("report"))
    report = write_report([top.path])
    assert report.out == top.path / "report"
    assert [r.label for r in report.runs] == ["staged/stage1", "staged/stage2"]
    assert _made(report) == {"summary.md", "progress.png", "parameters-staged-stage1.png", "workers-staged-stage1.png",
                             "layer-path-staged-stage2.png", "pareto-staged-stage2.png", "workers-staged-stage2.png"}
    assert _overview_row(report.out, "staged/stage2")[3:9] == _expected_row(RunDir(top.path / "stage2"))
