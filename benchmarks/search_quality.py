"""Does evolving a merge beat the obvious alternatives? Small zoo, equal budgets.

Compares, on the validation split (what is optimized) and the test split (what
is reported):

* best single source model (base and each fine-tune), picked on validation;
* best grid merge: TIES and DARE-TIES, one shared weight in {0.3, 0.5, 0.7, 1.0}
  x density in {0.3, 0.5, 0.7} (24 merges), picked on validation;
* evolved parameter-space search (the `zoo-small-ties` preset: per-model weight
  and density, here per 2 layer groups by default: 12 genes) with CMA-ES and
  TPE, and random search, with equal budgets (96 evaluations each by
  default), over 3 seeds (mean and spread reported).

Target: evolved search beats the best source and the best grid merge on the
test average.

    python benchmarks/search_quality.py [--budget 96] [--layer-groups 2] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from itertools import product
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "search_spaces" / "zoo-small-ties.yaml"


def main() -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's per-candidate bars would drown the table
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=96)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--optimizers", default="cmaes,tpe,random")
    parser.add_argument("--layer-groups", type=int, default=2,
                        help="layer groups of the evolved genome (the preset has 1: 6 genes; 2: 12 genes)")
    args = parser.parse_args()

    from evomerge.evaluation.registry import build_evaluator
    from evomerge.materialize.resident import ResidentMerger
    from evomerge.recipe import Recipe
    from evomerge.run.executor import LocalExecutor
    from evomerge.run.rundir import RunDir
    from evomerge.run.runner import Runner, ranked
    from evomerge.spaces.space import SearchSpace

    space = SearchSpace.from_file(PRESET).with_overrides(budget=args.budget)
    if args.layer_groups:
        space = space.with_overrides(genome={**space.genome.model_dump(), "layer_groups": args.layer_groups})
    space = space.resolved()
    objective = space.objective
    base, sources = space.models.base, list(space.models.sources)
    merger = ResidentMerger(base, sources)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    splits = {split: [build_evaluator(spec) for spec in objective.for_split(split)] for split in ("validation", "test")}
    for evaluators in splits.values():
        for ev in evaluators:
            ev.setup(merger.model, tokenizer)

    def score(recipe: Recipe, split: str) -> float:
        model = merger.materialize(recipe)
        metrics = {}
        for ev in splits[split]:
            metrics.update(ev(model, tokenizer))
        return objective.values(metrics)[0]

    def both(recipe: Recipe) -> tuple[float, float]:
        return score(recipe, "validation"), score(recipe, "test")

    rows: list[tuple[str, str, str]] = []
    start = time.perf_counter()

    # single models, as "merges" that take one model whole (linear weight 1)
    singles = {Path(m).name: both(Recipe(merge_method="linear", models=[{"model": m, "parameters": {"weight": 1.0}}]))
               for m in [base, *sources]}
    name, (val, test) = max(singles.items(), key=lambda kv: kv[1][0])
    rows.append(("best source (by validation)", f"{val:.3f}", f"{test:.3f}  ({name})"))
    best_source_test = test

    grid = {}
    for method, weight, density in product(("ties", "dare_ties"), (0.3, 0.5, 0.7, 1.0), (0.3, 0.5, 0.7)):
        recipe = Recipe(merge_method=method, base_model=base, parameters={"normalize": False},
                        models=[{"model": m, "parameters": {"weight": weight, "density": density}} for m in sources],
                        random_seed=space.seed if method == "dare_ties" else None)
        grid[f"{method} w={weight} d={density}"] = both(recipe)
    name, (val, test) = max(grid.items(), key=lambda kv: kv[1][0])
    rows.append((f"best grid merge ({len(grid)} points)", f"{val:.3f}", f"{test:.3f}  ({name})"))
    best_grid_test = test

    tmp = Path(tempfile.mkdtemp(prefix="evomerge-quality-"))
    evolved: dict[str, list[float]] = {}
    for opt in args.optimizers.split(","):
        vals, tests = [], []
        for seed in map(int, args.seeds.split(",")):
            run = RunDir.create(tmp / f"{opt}-{seed}", space.with_overrides(
                seed=seed, optimizer={"name": opt, "settings": {}}))
            Runner(run, lambda s: LocalExecutor(s.model_dump(mode="json"))).run()
            best = ranked(run.journal(), objective.directions)[0]
            vals.append(best.fitness[0])
            tests.append(score(Recipe.model_validate(best.recipe), "test"))
        evolved[opt] = tests
        spread = f" ± {statistics.stdev(tests):.3f}" if len(tests) > 1 else ""
        rows.append((f"{opt} search, {args.budget} evals × {len(tests)} seeds, {space.build_genome().dim} genes", f"{statistics.mean(vals):.3f}",
                     f"{statistics.mean(tests):.3f}{spread}  (per seed {', '.join(f'{t:.3f}' for t in tests)})"))

    print("\nsmall zoo, fitness = mean exact match over shift/rev/sort (200 validation / 200 test items per task)")
    print(f"{'':<40} {'validation':>10}   test")
    for label, val, test in rows:
        print(f"{label:<40} {val:>10}   {test}")
    for opt, tests in evolved.items():
        mean = statistics.mean(tests)
        print(f"{opt}: test mean {mean:.3f} vs best source {best_source_test:.3f} ({mean - best_source_test:+.3f}), "
              f"vs best grid {best_grid_test:.3f} ({mean - best_grid_test:+.3f}) -> "
              f"{'beats both' if mean > max(best_source_test, best_grid_test) else 'does NOT beat both'}")
    print(f"total {time.perf_counter() - start:.0f} s; runs under {tmp}")


if __name__ == "__main__":
    main()
