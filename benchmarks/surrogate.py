"""Is prediction entropy a good, cheap stand-in for the full metric?

For each search space given (it must have a ``surrogate`` section), scores
``--candidates`` random parameter-space genomes with the surrogate and with the
space's objective on one resident model, then prints Spearman's rho between
the surrogate and the objective (both oriented so that lower is better: for
entropy vs accuracy that is rho(entropy, -accuracy)) and how much cheaper the
surrogate is per candidate (materialization excluded from both).

    python benchmarks/surrogate.py search_spaces/zoo-small-ties-screened.yaml --candidates 60

Targets (issue 7): rho >= 0.8 and >= 10x cheaper.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np


def oriented(value: float, direction: str) -> float:
    """The value with lower = better."""
    return value if direction == "minimize" else -value


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def measure(space_file: Path, candidates: int, seed: int) -> dict:
    import torch

    from evomerge.evaluation.registry import build_evaluator
    from evomerge.io.live import load_tokenizer
    from evomerge.materialize.resident import ResidentMerger
    from evomerge.spaces.space import SearchSpace

    space = SearchSpace.from_file(space_file)
    if space.surrogate is None:
        raise SystemExit(f"{space_file}: no surrogate section")
    space = space.resolved(relative_to=space_file.parent)
    genome = space.build_genome()
    merger = ResidentMerger(space.models.base, list(space.models.sources), threads=torch.get_num_threads())
    tokenizer = load_tokenizer(space.models.base)
    full = [build_evaluator(s) for s in space.objective.evaluators]
    cheap = [build_evaluator(s) for s in space.surrogate.evaluators]
    for ev in full + cheap:
        ev.setup(merger.model, tokenizer)
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(candidates):
        model = merger.materialize(genome.decode(rng.random(genome.dim)))
        start = time.perf_counter()
        metrics = {}
        for ev in full:
            metrics.update(ev(model, tokenizer))
        middle = time.perf_counter()
        surrogate_metrics = {}
        for ev in cheap:
            surrogate_metrics.update(ev(model, tokenizer))
        end = time.perf_counter()
        rows.append({
            "fitness": space.objective.values(metrics)[0],
            "surrogate": space.surrogate.value(surrogate_metrics),
            "full_s": middle - start,
            "surrogate_s": end - middle,
        })
    fitness = [oriented(r["fitness"], space.objective.directions[0]) for r in rows]
    surrogate = [oriented(r["surrogate"], space.surrogate.direction) for r in rows]
    full_s = statistics.mean(r["full_s"] for r in rows)
    cheap_s = statistics.mean(r["surrogate_s"] for r in rows)
    return {
        "space": space.name, "candidates": candidates, "rho": spearman(surrogate, fitness),
        "full_s": full_s, "surrogate_s": cheap_s, "ratio": full_s / cheap_s,
        "fitness_range": (min(r["fitness"] for r in rows), max(r["fitness"] for r in rows)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spaces", nargs="+", type=Path)
    parser.add_argument("--candidates", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{'space':32} {'n':>4} {'rho':>6} {'full s':>8} {'surr. s':>8} {'cheaper':>8}  fitness range")
    for path in args.spaces:
        r = measure(path, args.candidates, args.seed)
        lo, hi = r["fitness_range"]
        print(f"{r['space']:32} {r['candidates']:>4} {r['rho']:>6.3f} {r['full_s']:>8.3f} {r['surrogate_s']:>8.4f} "
              f"{r['ratio']:>7.1f}x  {lo:.3f}..{hi:.3f}", flush=True)


if __name__ == "__main__":
    main()
