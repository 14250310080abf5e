"""Put a report together: which plots apply to which run, drawn into a temp directory renamed into place."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.fsutil import atomic_dir
from evomerge.report import plots
from evomerge.report.runs import ReportRun, load_runs
from evomerge.report.summary import SUMMARY, summary_markdown

REPORT = "report"


@dataclass(frozen=True)
class PlotKind:
    """A per-run plot: when it applies and how it is drawn."""

    name: str
    what: str
    applies: Callable[[ReportRun], bool]
    draw: Callable[[ReportRun, Path], None]


PER_RUN = [
    PlotKind("parameters", "the best candidate's per-layer parameters (weight, density, ...) per source model",
             lambda r: r.genome_type == "parameter" and r.best is not None, plots.parameters),
    PlotKind("layer-path", "the best candidate's layer path: which source layer in which slot, with its input scale",
             lambda r: r.genome_type == "dataflow" and r.best is not None, plots.path),
    PlotKind("pareto", "every successful evaluation in objective space, the Pareto front highlighted",
             lambda r: len(r.objectives) > 1 and r.best is not None, plots.pareto),
    PlotKind("workers", "each worker's evaluations over wall time by status, and failures so far",
             lambda r: bool(r.timed), plots.workers),
    PlotKind("surrogate", "surrogate score against the full score (screened candidates: the estimate told)",
             lambda r: any(e.ok and e.surrogate is not None for e in r.evaluations), plots.surrogate),
]


@dataclass(frozen=True)
class Plot:
    """A PNG the report made."""

    file: str
    what: str
    #: the run it shows; None for the progress plot, which overlays every run
    run: str | None


@dataclass(frozen=True)
class Report:
    """What ``write_report`` wrote: the directory, the runs it read, the plots it made."""

    out: Path
    runs: list[ReportRun]
    plots: list[Plot]


def default_out(paths: list[Path]) -> Path:
    """Where a report goes without ``--out``: the first run's ``report/``."""
    return Path(paths[0]) / REPORT


def write_report(paths: list[Path], out: Path | None = None) -> Report:
    """Plots and ``summary.md`` for the runs at ``paths``, written to ``out`` (default: the first run's report/).

    Reads the runs' config and journal only. The report is built in a temp
    directory next to ``out`` and renamed over it at the end, so an existing
    report is replaced only by a complete one; a directory that is not a
    report is never replaced.
    """
    runs = load_runs([Path(p) for p in paths])
    out = Path(out) if out is not None else default_out(paths)
    if out.exists() and not _is_report(out):
        raise EvomergeError(f"{out}: exists and is not an evomerge report (a report holds only summary.md and "
                            "PNG plots); choose another --out")
    made: list[Plot] = []
    with atomic_dir(out, replace=True) as tmp:
        made.append(Plot("progress.png", "fitness per evaluation and best so far"
                         + (", over evaluations and wall time" if any(r.timed for r in runs) else ""), None))
        plots.progress(runs, tmp / "progress.png")
        for run in runs:
            suffix = "" if len(runs) == 1 else f"-{_slug(run.label)}"
            for kind in PER_RUN:
                if kind.applies(run):
                    file = f"{kind.name}{suffix}.png"
                    kind.draw(run, tmp / file)
                    made.append(Plot(file, kind.what, run.label))
        (tmp / SUMMARY).write_text(summary_markdown(runs, made))
    return Report(out, runs, made)


def _is_report(path: Path) -> bool:
    """Whether ``path`` is an empty directory or one a report wrote: ``summary.md`` and PNG plots, nothing else
    (it is replaced whole, so a folder also holding the user's files must not pass for one)."""
    if not path.is_dir():
        return False
    entries = list(path.iterdir())
    return not entries or ((path / SUMMARY).is_file()
                           and all(e.is_file() and (e.name == SUMMARY or e.suffix == ".png") for e in entries))


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-")
