"""Staged search (Sakana's PS → DFS): a parameter-space run, then a data-flow run over its winner.

A staged run directory holds the staged space in ``config.yaml`` and one plain
run directory per stage (``stage1/``, ``stage2/``). Stage 2 is created once
stage 1 has spent its budget and exported its winner to ``stage1/best``; its
sources are that winner plus the original sources. Resuming a staged run
resumes whichever stage is unfinished, so the usual guarantees hold per stage.
"""

from __future__ import annotations

from collections.abc import Callable

from evomerge.run.rundir import RunDir
from evomerge.run.runner import RunProgress, Runner


def stage_dir(run: RunDir, index: int) -> RunDir:
    """The run directory of stage ``index`` (0 or 1) of a staged run."""
    return RunDir(run.path / f"stage{index + 1}")


def run_stages(run: RunDir, make_runner: Callable[[RunDir], Runner],
               on_stage: Callable[[int, RunDir], None] | None = None) -> tuple[RunDir, RunProgress]:
    """Drive both stages to their budgets; returns the last stage's run and progress."""
    from evomerge.run.export import export_run

    space = run.space()
    first = stage_dir(run, 0)
    if not first.config_file.exists():
        RunDir.create(first.path, space.stage(0))
    if on_stage:
        on_stage(0, first)
    progress = make_runner(first).run()
    if not first.best_dir.exists():
        export_run(first, first.best_dir, score=False)
    second = stage_dir(run, 1)
    wanted = space.stage(1, winner=str(first.best_dir.resolve()))
    if not second.config_file.exists():
        RunDir.create(second.path, wanted)
    elif second.space().budget < wanted.budget:  # the staged budget was raised on resume
        second.save_space(second.space().with_overrides(budget=wanted.budget))
    if on_stage:
        on_stage(1, second)
    progress = make_runner(second).run()
    return second, progress


def latest_run(run: RunDir) -> RunDir:
    """The run whose journal ``status``/``export`` show: the latest started stage of a staged run."""
    if run.space().genome.type != "staged":
        return run
    second = stage_dir(run, 1)
    return second if second.config_file.exists() else stage_dir(run, 0)
