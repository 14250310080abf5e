"""The report's ``summary.md``: key numbers per run, the plots made, the best candidate's genes and recipe."""

from __future__ import annotations

from typing import TYPE_CHECKING

import yaml

from evomerge.report.runs import ReportRun, format_line_numbers
from evomerge.report.series import (
    evals_per_minute,
    layer_path,
    pareto_mask,
    rank_correlation,
    wall_clock,
)

if TYPE_CHECKING:
    from evomerge.report.build import Plot

SUMMARY = "summary.md"


def number(value: float) -> str:
    """How the summary writes a fitness value (6 significant digits)."""
    return f"{value:.6g}"


def duration(seconds: float) -> str:
    """``12.3 s``, ``4 min 05 s``, ``2 h 03 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def summary_markdown(runs: list[ReportRun], plots: list[Plot]) -> str:
    """The whole ``summary.md``."""
    lines = ["# evomerge report", "", _overview(runs), "", "## Plots", ""]
    for plot in plots:
        where = "" if plot.run is None else f" ({plot.run})"
        lines += [f"- `{plot.file}`{where}: {plot.what}", "", f"  ![{plot.file}]({plot.file})", ""]
    for run in runs:
        lines += ["", *_run_section(run)]
    return "\n".join(lines).rstrip() + "\n"


def _overview(runs: list[ReportRun]) -> str:
    head = ["run", "genome", "optimizer", "evaluations", "ok", "failed", "oom", "screened",
            "best", "wall time", "evals/min"]
    rows = []
    for run in runs:
        best = run.best
        clock = wall_clock(run.timed)
        rate = evals_per_minute(len(run.full), clock)
        rows.append([
            run.label, run.genome_type, run.space.optimizer.name, f"{len(run.full)}/{run.space.budget}",
            str(run.count("ok")), str(run.count("failed")), str(run.count("oom")), str(len(run.screened)),
            # named: overlaid runs may optimize different objectives
            "—" if best is None else f"{run.objectives[0]} {number(best.fitness[0])} (#{best.id})",
            "—" if clock is None else duration(clock.seconds), "—" if rate is None else f"{rate:.2f}",
        ])
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def _run_section(run: ReportRun) -> list[str]:
    best = run.best
    lines = [f"## {run.label}", "", f"- run directory: `{run.run.path}`"]
    if best is None:
        lines.append("- best: no successful full evaluation")
    else:
        values = ", ".join(f"{name} = {number(v)}" for name, v in zip(run.objectives, best.fitness))
        lines.append(f"- best: evaluation #{best.id}, {values}")
    lines.append(f"- evaluations: {len(run.full)} of a budget of {run.space.budget} "
                 f"({run.count('ok')} ok, {run.count('failed')} failed, {run.count('oom')} oom)"
                 + (f"; {len(run.screened)} more screened out by the surrogate" if run.screened else ""))
    clock = wall_clock(run.timed)
    if clock is None:
        lines.append("- wall time: unknown (this journal has no worker start/finish times; "
                     "it was written before evomerge recorded them)")
    else:
        rate = evals_per_minute(len(run.full), clock)
        pauses = (f" over {len(clock.pauses) + 1} sessions (the {duration(sum(b - a for a, b in clock.pauses))} "
                  "between them left out)") if clock.pauses else ""
        lines.append(f"- wall time: {duration(clock.seconds)} from the first start to the last finish{pauses}"
                     + ("" if rate is None else f", {rate:.2f} evaluations/min")
                     + f", worker utilization {clock.utilization:.0%} ({clock.workers} worker(s)"
                     + ("; surrogate probes of fully evaluated candidates are not journaled, so not counted"
                        if run.has_surrogate else "") + ")")
    lines.append(f"- evaluation time: {duration(sum(e.seconds for e in run.evaluations))} summed over evaluations")
    if run.unreadable:
        lines.append(f"- journal: skipped {len(run.unreadable)} unreadable line(s) "
                     f"({format_line_numbers(run.unreadable)}); the numbers above leave them out")
    lines += _surrogate_line(run) + _pareto_lines(run)
    if best is not None:
        if run.genome_type == "dataflow":
            lines += ["", "Layer path of the best candidate:", "", "| position | model | layer | input scale |",
                      "|---:|---|---:|---:|"]
            lines += [f"| {i} | {s.model} | {s.layer} | {s.scale:.4g} |"
                      for i, s in enumerate(layer_path(best, run.space.genome))]
        lines += ["", "<details><summary>genes of the best candidate</summary>", "", "| gene | value |", "|---|---:|"]
        lines += [f"| `{name}` | {value:.4g} |" for name, value in best.genes.items()]
        lines += ["", "</details>", "", "<details><summary>recipe of the best candidate (mergekit YAML)</summary>",
                  "", "```yaml", yaml.safe_dump(best.recipe, sort_keys=False).rstrip(), "```", "", "</details>"]
    return lines


def _surrogate_line(run: ReportRun) -> list[str]:
    pairs = [(e.surrogate, e.fitness[0]) for e in run.full if e.ok and e.surrogate is not None]
    if not pairs:
        return []
    rho = rank_correlation(*map(list, zip(*pairs)))
    return [f"- surrogate: rank correlation with {run.objectives[0]} "
            + ("undefined (a constant side)" if rho is None else f"{rho:.3f}")
            + f" over {len(pairs)} fully evaluated candidates"]


def _pareto_lines(run: ReportRun) -> list[str]:
    if len(run.objectives) < 2:
        return []
    ok = [e for e in run.full if e.ok]
    front = [e for e, keep in zip(ok, pareto_mask([e.fitness for e in ok], run.directions)) if keep]
    front.sort(key=lambda e: e.fitness[0], reverse=run.directions[0] == "maximize")
    members = "; ".join(f"#{e.id} (" + ", ".join(number(v) for v in e.fitness) + ")" for e in front)
    objectives = ", ".join(run.objectives)
    return [f"- Pareto front: {len(front)} of {len(ok)} successful evaluations ({objectives}): {members}"]
