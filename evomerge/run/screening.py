"""Surrogate screening: which candidates of a batch get the full evaluation, and what the rest are told.

A search space's ``surrogate`` section (``evomerge.evaluation.objective.Surrogate``)
turns it on. The runner asks a batch, scores every candidate with the cheap
surrogate (e.g. prediction entropy on unlabeled inputs), gives the best
``keep`` fraction the full evaluation and journals the rest as *screened*.

What a screened candidate is told: per objective, the fitness predicted from
its surrogate by a least-squares line through every fully evaluated
candidate's (surrogate, fitness) pair, but never better than the worst fully
evaluated candidate of its own batch (before three such pairs exist: that worst
value itself). The cap is what the screening decision already claimed (the
surrogate ranked it below every kept candidate), so the optimizer learns
"worse than what you kept", never a fabricated improvement: a screened
candidate cannot become an incumbent, a CMA-ES parent or a TPE "good" sample
ahead of a measured one. Screened candidates are never chosen as the run's
best or exported; both scores are journaled.
"""

from __future__ import annotations

import math

import numpy as np


def split_batch(scores: dict[int, float], keep: float, direction: str, limit: int) -> tuple[list[int], list[int]]:
    """Candidate ids to evaluate fully (best ``keep`` fraction, at least one, at most ``limit``) and to screen."""
    sign = 1.0 if direction == "minimize" else -1.0
    order = sorted(scores, key=lambda cid: (sign * scores[cid], cid))
    n_keep = max(1, min(limit, math.ceil(keep * len(order) - 1e-9)))
    return order[:n_keep], order[n_keep:]


def estimate(surrogate: float, history: list[tuple[float, list[float]]], batch_fitness: list[list[float]],
             directions: list[str]) -> list[float]:
    """Fitness told to a screened candidate; see the module doc.

    ``history``: (surrogate, fitness) of every fully evaluated candidate so
    far; ``batch_fitness``: the fitness of the fully evaluated candidates of
    this batch (at least one).
    """
    out = []
    xs = np.array([s for s, _ in history], dtype=float)
    for i, direction in enumerate(directions):
        values = [f[i] for f in batch_fitness]
        cap = min(values) if direction == "maximize" else max(values)
        ys = np.array([f[i] for _, f in history], dtype=float)
        if len(history) >= 3 and np.ptp(xs) > 0:
            slope, intercept = np.polyfit(xs, ys, 1)
            predicted = float(intercept + slope * surrogate)
            out.append(min(predicted, cap) if direction == "maximize" else max(predicted, cap))
        else:
            out.append(cap)
    return out
