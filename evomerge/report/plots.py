"""The report's figures, one function per plot, each writing one PNG.

Figures are built as ``matplotlib.figure.Figure`` objects and rendered by the
Agg canvas: no pyplot, so no GUI backend, no global figure state, and the
report works on headless machines and inside other programs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from evomerge.report.runs import ReportRun
from evomerge.report.series import (
    best_so_far,
    layer_path,
    objective_values,
    parameter_layers,
    pareto_mask,
    wall_clock,
)
from evomerge.report.summary import duration
from evomerge.run.rundir import Evaluation
from evomerge.spaces.parameter import DEFAULT_BOUNDS

STATUS_COLORS = {"ok": "tab:green", "failed": "tab:red", "oom": "tab:orange", "screened": "tab:gray"}
DPI = 100
WALL_LABEL = "wall time (minutes)"
PAUSED = ", pauses between sessions left out"


def _color(i: int) -> str:
    return f"C{i % 10}"


def _kind(e: Evaluation) -> str:
    """The colour key of an evaluation: its status, or ``screened``."""
    return "screened" if e.screened else e.status


def _save(fig: Figure, file: Path) -> None:
    fig.savefig(file, dpi=DPI)


def progress(runs: list[ReportRun], file: Path) -> None:
    """Fitness of every full evaluation and the best so far, over evaluations and (when timed) wall time.

    One row per objective, runs overlaid in their own colour: runs share a row
    when their objectives are defined alike (name, metrics and weights,
    direction), never when only the names agree; failed evaluations are ticks
    on the bottom edge.
    """
    fitness = list({f.model_dump_json(): f for r in runs for f in r.space.objective.fitness}.values())
    names = [f.name if sum(g.name == f.name for g in fitness) == 1 else
             f"{f.name} ({', '.join(r.label for r in runs if f in r.space.objective.fitness)})" for f in fitness]
    rows = len(fitness)
    timed = any(r.timed for r in runs)
    paused = any((c := wall_clock(r.timed)) is not None and c.pauses for r in runs)
    cols = 2 if timed else 1
    fig = Figure(figsize=(5.2 * cols, 3.4 * rows), layout="constrained")
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    for row, (f, name) in enumerate(zip(fitness, names)):
        for i, run in enumerate(runs):
            if f not in run.space.objective.fitness:
                continue
            k = run.space.objective.fitness.index(f)
            full = run.full
            values = objective_values(full, k)
            best = best_so_far(values, run.directions[k])
            clock = wall_clock(run.timed)
            xs = {"evaluation": np.arange(1, len(full) + 1, dtype=float)}
            if timed:
                xs["minutes"] = np.array([np.nan if e.finished is None or clock is None
                                          else clock.elapsed(e.finished) / 60 for e in full])
            for col, x in enumerate(xs.values()):
                ax = axes[row, col]
                ok = np.array([v is not None for v in values])
                ax.scatter(x[ok], [v for v in values if v is not None], s=12, alpha=0.45, color=_color(i),
                           linewidths=0)
                ax.step(x, [np.nan if b is None else b for b in best], where="post", color=_color(i),
                        label=run.label)
                if (~ok).any():
                    ax.plot(x[~ok], np.full((~ok).sum(), 0.02), "|", color="tab:red", ms=8,
                            transform=ax.get_xaxis_transform())
        axes[row, 0].xaxis.get_major_locator().set_params(integer=True)
        if timed:
            axes[row, 1].set_xlim(left=0)
        for col, xlabel in enumerate(["full evaluation", WALL_LABEL + (PAUSED if paused else "")][:cols]):
            ax = axes[row, col]
            ax.set_xlabel(xlabel)
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=_color(i), label=r.label) for i, r in enumerate(runs)]
    handles += [Line2D([], [], color=_color(0), marker="o", ls="", alpha=0.45, label="each evaluation"),
                Line2D([], [], color=_color(0), label="best so far")]
    if any(not e.ok for r in runs for e in r.full):
        handles.append(Line2D([], [], color="tab:red", marker="|", ls="", ms=8, label="failed"))
    axes[0, 0].legend(handles=handles if len(runs) > 1 else handles[1:], fontsize=8, loc="best")
    fig.suptitle("search progress" if len(runs) > 1 else f"{runs[0].label}: search progress")
    _save(fig, file)


def parameters(run: ReportRun, file: Path) -> None:
    """Heatmaps of the best candidate's per-layer parameters (weight, density, …) per source model."""
    best = run.best
    num_layers = int(best.metrics.get("merge/num_layers", 1))
    panels = parameter_layers(best.recipe, best.genes, num_layers)
    fig = Figure(figsize=(1.2 + 3.6 * len(panels), 0.9 + 0.45 * max(len(r) for r, _ in panels.values()) + 1.2),
                 layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    searched = run.space.genome.genes or DEFAULT_BOUNDS
    for ax, (name, (labels, matrix)) in zip(axes, panels.items()):
        # colours span the gene's search bounds, so a value reads the same in every run and panel
        low, high = searched.get(name, (matrix.min(), matrix.max()))
        image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=low, vmax=high)
        fig.colorbar(image, ax=ax, shrink=0.9)
        ax.set_title(name)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("layer")
        step = max(1, matrix.shape[1] // 12)
        ax.set_xticks(range(0, matrix.shape[1], step))
        if matrix.size <= 80:
            for (r, c), v in np.ndenumerate(matrix):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < (low + high) / 2 else "black")
    fig.suptitle(f"{run.label}: best candidate #{best.id} ({best.recipe.get('merge_method')}), "
                 f"{run.objectives[0]} {best.fitness[0]:.4g}")
    _save(fig, file)


def path(run: ReportRun, file: Path) -> None:
    """The best data-flow candidate's layer path: the source layer in each slot and its input scale."""
    best = run.best
    steps = layer_path(best, run.space.genome)
    models = list(dict.fromkeys(s.model for s in steps))
    colors = [_color(models.index(s.model)) for s in steps]
    x = np.arange(len(steps))
    fig = Figure(figsize=(max(5.0, 0.45 * len(steps) + 2), 5.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    top.plot(x, [s.layer for s in steps], color="0.75", zorder=1)
    top.scatter(x, [s.layer for s in steps], c=colors, s=50, zorder=2)
    top.set_ylabel("source layer")
    top.yaxis.get_major_locator().set_params(integer=True)
    top.legend(handles=[Line2D([], [], color=_color(i), marker="o", ls="", label=m) for i, m in enumerate(models)],
               fontsize=8, loc="best")
    top.grid(alpha=0.3)
    bottom.bar(x, [s.scale for s in steps], color=colors)
    bottom.axhline(1.0, color="0.4", lw=0.8, ls="--")
    bottom.set_ylabel("input scale")
    bottom.set_xlabel("position on the path")
    bottom.set_xticks(x)
    fig.suptitle(f"{run.label}: best candidate #{best.id}, {len(steps)} layers, "
                 f"{run.objectives[0]} {best.fitness[0]:.4g}")
    _save(fig, file)


def pareto(run: ReportRun, file: Path) -> None:
    """Every successful full evaluation in objective space, the non-dominated front highlighted.

    One panel per pair of objectives; the front is computed over all objectives.
    """
    ok = [e for e in run.full if e.ok]
    points = np.array([e.fitness for e in ok], dtype=float)
    front = np.array(pareto_mask(points.tolist(), run.directions))
    names = run.objectives
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    fig = Figure(figsize=(4.6 * len(pairs), 4.0), layout="constrained")
    for ax, (i, j) in zip(fig.subplots(1, len(pairs), squeeze=False)[0], pairs):
        ax.scatter(points[~front, i], points[~front, j], s=14, color="0.6", label="dominated")
        order = np.argsort(points[front, i])
        ax.plot(points[front, i][order], points[front, j][order], "o--", color="tab:blue", ms=5, lw=0.8,
                label=f"Pareto front ({int(front.sum())})")
        ax.set_xlabel(f"{names[i]} ({run.directions[i]})")
        ax.set_ylabel(f"{names[j]} ({run.directions[j]})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"{run.label}: {len(ok)} successful evaluations")
    _save(fig, file)


def workers(run: ReportRun, file: Path) -> None:
    """What each worker did over wall time (one bar per evaluation, by status) and cumulative outcomes."""
    timed = run.timed
    clock = wall_clock(timed)
    fig = Figure(figsize=(9.0, 5.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    ids = sorted({e.worker for e in timed if e.worker is not None})
    bars: dict[tuple[int, str], list[tuple[float, float]]] = {}  # one artist per worker and status
    for e in timed:
        if e.worker is not None:
            bars.setdefault((e.worker, _kind(e)), []).append((clock.elapsed(e.started) / 60,
                                                              (e.finished - e.started) / 60))
    for (worker, kind), spans in bars.items():
        top.broken_barh(spans, (ids.index(worker) - 0.4, 0.8), facecolor=STATUS_COLORS[kind],
                        edgecolor="white", linewidth=0.5)
    top.set_yticks(range(len(ids)), [f"worker {w}" for w in ids])
    # a fully evaluated candidate's surrogate probe has no journal line, so screened runs undercount
    probes = " (surrogate probes of kept candidates not journaled)" if run.has_surrogate else ""
    top.set_title(f"worker utilization {clock.utilization:.0%} over {duration(clock.seconds)}{probes}")
    top.legend(handles=[Line2D([], [], color=c, lw=6, label=k) for k, c in STATUS_COLORS.items()
                        if any(_kind(e) == k for e in timed)],
               fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    order = sorted(timed, key=lambda e: e.finished)
    minutes = [clock.elapsed(e.finished) / 60 for e in order]
    for kind, color in STATUS_COLORS.items():
        counts = np.cumsum([_kind(e) == kind for e in order])
        if counts[-1]:
            bottom.step(minutes, counts, where="post", color=color, label=kind)
    bottom.set_ylabel("evaluations so far")
    bottom.set_xlabel(WALL_LABEL + (PAUSED if clock.pauses else ""))
    bottom.grid(alpha=0.3)
    bottom.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"{run.label}: workers and failures")
    _save(fig, file)


def surrogate(run: ReportRun, file: Path) -> None:
    """Surrogate score against the objective: measured for fully evaluated candidates, told for screened ones."""
    spec = run.space.surrogate
    name = "surrogate" if spec is None else f"surrogate: {', '.join(spec.metrics)} ({spec.direction})"
    fig = Figure(figsize=(5.4, 4.2), layout="constrained")
    ax = fig.subplots()
    full = [e for e in run.full if e.ok and e.surrogate is not None]
    screened = [e for e in run.screened if e.ok and e.surrogate is not None]
    ax.scatter([e.surrogate for e in full], [e.fitness[0] for e in full], s=18, color="tab:blue",
               label=f"fully evaluated ({len(full)})")
    if screened:
        ax.scatter([e.surrogate for e in screened], [e.fitness[0] for e in screened], s=18, facecolors="none",
                   edgecolors="tab:gray", label=f"screened out: estimate told ({len(screened)})")
    ax.set_xlabel(name)
    ax.set_ylabel(run.objectives[0])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"{run.label}: surrogate vs full score")
    _save(fig, file)
