"""The numbers behind the plots and the summary: pure functions of journal entries.

Nothing here draws or reads files, so each quantity is tested against the
journal it comes from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.run.rundir import Evaluation
from evomerge.spaces.dataflow import DataflowGenomeConfig


def best_so_far(values: list[float | None], direction: str) -> list[float | None]:
    """Running best of ``values`` (None = a failed evaluation, which never improves it)."""
    pick = max if direction == "maximize" else min
    out: list[float | None] = []
    best = None
    for v in values:
        if v is not None:
            best = v if best is None else pick(best, v)
        out.append(best)
    return out


def objective_values(evaluations: list[Evaluation], k: int) -> list[float | None]:
    """Objective ``k`` of each evaluation, None where it failed."""
    return [e.fitness[k] if e.ok and e.fitness else None for e in evaluations]


@dataclass(frozen=True)
class WallClock:
    """When a run's evaluations ran, from the journal's worker start/finish times.

    A resumed run ran in sessions; the time between one session's last finish
    and the next one's first start (the run was stopped) is a pause, left out
    of every duration here.
    """

    start: float
    end: float
    #: distinct workers that journaled timed work
    workers: int
    #: worker-seconds spent on journaled work
    busy: float
    #: worker-seconds the sessions had: each session's span times its workers
    capacity: float
    #: (last finish of a session, first start of the next) where that gap is positive
    pauses: tuple[tuple[float, float], ...] = ()

    @property
    def seconds(self) -> float:
        """Wall time from the first start to the last finish, pauses between sessions left out."""
        return self.elapsed(self.end)

    def elapsed(self, t: float) -> float:
        """Seconds from the first start to unix time ``t``, pauses before ``t`` left out."""
        return t - self.start - sum(min(b, t) - a for a, b in self.pauses if a < t)

    @property
    def utilization(self) -> float:
        """Busy share of the workers' wall time, in [0, 1]."""
        return self.busy / self.capacity if self.capacity > 0 else 0.0


def wall_clock(timed: list[Evaluation]) -> WallClock | None:
    """The wall clock of the timed evaluations, None when there are none.

    Sessions come from the journal's session numbers (a journal without them is
    one session).
    """
    if not timed:
        return None
    sessions: dict[int | None, list[Evaluation]] = {}
    for e in timed:
        sessions.setdefault(e.session, []).append(e)
    spans = sorted((min(e.started for e in s), max(e.finished for e in s),
                    max(1, len({e.worker for e in s if e.worker is not None}))) for s in sessions.values())
    pauses = tuple((a_end, b_start) for (_, a_end, _), (b_start, _, _) in pairwise(spans) if b_start > a_end)
    workers = {e.worker for e in timed if e.worker is not None}
    return WallClock(
        start=spans[0][0], end=max(end for _, end, _ in spans), workers=max(1, len(workers)),
        busy=sum(e.finished - e.started for e in timed if e.worker is not None),
        capacity=sum((end - start) * n for start, end, n in spans), pauses=pauses,
    )


def evals_per_minute(full_evaluations: int, clock: WallClock | None) -> float | None:
    """Full evaluations per wall-clock minute; None without times or with a zero span."""
    if clock is None or clock.seconds <= 0:
        return None
    return 60.0 * full_evaluations / clock.seconds


def pareto_mask(points: list[list[float]], directions: list[str]) -> list[bool]:
    """Which points no other point dominates (at least as good everywhere, better somewhere)."""
    signs = np.array([1.0 if d == "maximize" else -1.0 for d in directions])
    p = np.asarray(points, dtype=float).reshape(len(points), len(directions)) * signs
    mask = []
    for row in p:
        dominated = np.any(np.all(p >= row, axis=1) & np.any(p > row, axis=1))
        mask.append(not bool(dominated))
    return mask


def rank_correlation(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (ties share their mean rank); None when either side is constant."""
    if len(x) < 2:
        return None
    rx, ry = _ranks(np.asarray(x, dtype=float)), _ranks(np.asarray(y, dtype=float))
    if np.ptp(rx) == 0 or np.ptp(ry) == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(v: np.ndarray) -> np.ndarray:
    ranks = np.empty(len(v))
    ranks[np.argsort(v, kind="stable")] = np.arange(len(v), dtype=float)
    for value in np.unique(v):
        tied = v == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def model_labels(paths: list[str]) -> list[str]:
    """Short names of model directories, numbered where two share a name (as gene names do)."""
    labels: list[str] = []
    for path in paths:
        name = Path(path).name or "model"
        labels.append(name if name not in labels else f"{name}{len(labels)}")
    return labels


def parameter_layers(recipe: dict[str, Any], genes: dict[str, float],
                     num_layers: int) -> dict[str, tuple[list[str], np.ndarray]]:
    """Per searched parameter: row labels and a (rows × layers) matrix of its value at each layer.

    Rows are the source models (per-source parameters such as weight and
    density) or ``all sources`` (method-wide ones such as slerp's ``t``). A
    parameter genome writes one value per model (the same at every layer) or a
    gradient list with one anchor per layer, so the recipe holds every
    layer's value directly.
    """
    models = recipe.get("models") or []
    labels = model_labels([m["model"] for m in models])
    rows: dict[str, list[tuple[str, list[float] | float]]] = {}
    for label, m in zip(labels, models):
        for name, value in (m.get("parameters") or {}).items():
            rows.setdefault(name, []).append((label, value))
    for name, value in (recipe.get("parameters") or {}).items():
        # fixed method-wide parameters (normalize, lambda) are not genes; searched ones are named p or p[gN]
        if name in genes or f"{name}[g0]" in genes:
            rows.setdefault(name, []).append(("all sources", value))
    out = {}
    for name, entries in rows.items():
        width = max([num_layers] + [len(v) for _, v in entries if isinstance(v, list)])
        matrix = np.array([v if isinstance(v, list) else [v] * width for _, v in entries], dtype=float)
        out[name] = ([label for label, _ in entries], matrix)
    return out


@dataclass(frozen=True)
class PathStep:
    """One step of a data-flow candidate's layer path."""

    model: str
    layer: int
    #: the scale applied to the hidden state entering this layer
    scale: float


_USE = re.compile(r"^use\[(\d+)\]:")


def layer_path(evaluation: Evaluation, genome: DataflowGenomeConfig) -> list[PathStep]:
    """The layer path of a data-flow candidate: the recipe's layers with the input scales of its genes.

    The recipe holds the path (one passthrough slice per layer) but with the
    scales folded into output projections; the genes hold the scales as
    searched. Positions follow ``DataflowGenome.path``: 0 is the anchor's first
    block, t + 1 slot t, T + 1 the anchor's last block.
    """
    steps = []
    for sl in evaluation.recipe["slices"]:
        source = sl["sources"][0]
        first, stop = source["layer_range"]
        steps.extend((source["model"], layer) for layer in range(first, stop))
    paths = list(dict.fromkeys(m for m, _ in steps))
    labels = dict(zip(paths, model_labels(paths)))
    slots = {int(m.group(1)): v for name, v in evaluation.genes.items() if (m := _USE.match(name))}
    end = len(slots) + 1
    positions = [0, *(t + 1 for t in sorted(slots) if slots[t] > genome.threshold), end]

    def name(position: int) -> str:
        return "start" if position == 0 else "end" if position == end else str(position - 1)

    scales = [1.0]
    for previous, position in pairwise(positions):
        key = {"pair": f"scale[{name(previous)}->{name(position)}]", "slot": f"scale[->{name(position)}]"}
        scales.append(evaluation.genes[key[genome.scales]] if genome.scales in key else 1.0)
    return [PathStep(labels[model], layer, scale) for (model, layer), scale in zip(steps, scales)]
