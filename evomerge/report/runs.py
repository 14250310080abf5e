"""The runs a report is made of: each run directory's frozen space and readable journal.

A staged run directory stands for its stages (``stage1/``, ``stage2/``), each a
plain run with its own genome; they are reported side by side. Nothing here
writes to a run directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.run.rundir import Evaluation, RunDir
from evomerge.run.runner import ranked
from evomerge.run.staged import stage_dir
from evomerge.spaces.space import SearchSpace


@dataclass
class ReportRun:
    """One plain run as the report sees it."""

    label: str
    run: RunDir
    space: SearchSpace
    #: readable journal lines, in journal (finish) order
    evaluations: list[Evaluation]
    #: numbers of the journal lines that could not be read (skipped)
    unreadable: list[int]

    @property
    def directions(self) -> list[str]:
        return self.space.objective.directions

    @property
    def objectives(self) -> list[str]:
        return self.space.objective.names

    @property
    def genome_type(self) -> str:
        return self.space.genome.type

    @property
    def full(self) -> list[Evaluation]:
        """Evaluations that ran the objective (every one but those screened out by the surrogate)."""
        return [e for e in self.evaluations if not e.screened]

    @property
    def screened(self) -> list[Evaluation]:
        return [e for e in self.evaluations if e.screened]

    def count(self, status: str) -> int:
        """Full evaluations with this status (ok, failed, oom)."""
        return sum(e.status == status for e in self.full)

    @property
    def best(self) -> Evaluation | None:
        """The best successful full evaluation by the first objective, as ``status`` and ``export`` choose it."""
        ranking = ranked(self.evaluations, self.directions)
        return ranking[0] if ranking else None

    @property
    def timed(self) -> list[Evaluation]:
        """Evaluations with worker start and finish times (journals before these fields have none)."""
        return [e for e in self.evaluations if e.started is not None and e.finished is not None]

    @property
    def has_surrogate(self) -> bool:
        return any(e.surrogate is not None for e in self.evaluations)


def load_runs(paths: list[Path]) -> list[ReportRun]:
    """The plain runs behind ``paths`` (stages of a staged run expanded), each with a readable journal.

    Raises ``EvomergeError`` for a directory that is not a run, and for a run
    without a single readable evaluation (nothing to plot).
    """
    runs: list[ReportRun] = []
    for path in paths:
        top = RunDir.open(path)
        if top.space().genome.type == "staged":
            parts = [(f"{top.path.name}/{stage.path.name}", stage)
                     for stage in (stage_dir(top, 0), stage_dir(top, 1)) if stage.config_file.exists()]
        else:
            parts = [(top.path.name, top)]
        if not parts:
            raise EvomergeError(f"{top.path}: a staged run whose first stage has not started; nothing to report")
        for label, run in parts:
            evaluations, unreadable = run.readable_journal()
            if not evaluations:
                skipped = f" ({len(unreadable)} unreadable line(s) skipped)" if unreadable else ""
                raise EvomergeError(f"{run.journal_file}: no evaluations journaled yet{skipped}; nothing to report")
            runs.append(ReportRun(label, run, run.space(), evaluations, unreadable))
    labels = [r.label for r in runs]
    for i, r in enumerate(runs):  # two runs/NAME from different parents would share a label
        if labels.count(r.label) > 1:
            r.label = f"{r.label} ({i + 1})"
    return runs


def format_line_numbers(numbers: list[int], shown: int = 5) -> str:
    """``line 3, 7, 9`` or ``lines 3, 7, 9, 12, 15 and 4 more`` for messages."""
    head = ", ".join(str(n) for n in numbers[:shown])
    more = f" and {len(numbers) - shown} more" if len(numbers) > shown else ""
    return f"line{'s' if len(numbers) > 1 else ''} {head}{more}"
