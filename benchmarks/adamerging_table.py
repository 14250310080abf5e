"""AdaMerging reproduction table: merge baselines vs task-/layer-wise AdaMerging(++) on a zoo.

Rows (test split, accuracy per task and average), as in Yang et al. (ICLR 2024)
Table 2: weight averaging, task arithmetic (lambda 0.3 and the best lambda on
the validation split), TIES (top 20 %, lambda 0.3 and best), task-wise and
layer-wise AdaMerging and AdaMerging++, and the individual fine-tunes (each on
its own task). AdaMerging trains on the unlabeled split only; "best lambda"
rows pick lambda on the validation split.

    python benchmarks/adamerging_table.py --zoo vision/small --steps 500 --markdown
    python benchmarks/adamerging_table.py --zoo lm/small --steps 200

The paper's ordering on ViT-B/32, 8 tasks: averaging 65.8 < TA 69.1 < TIES
72.4 < task-wise 71.1 / ++ 73.7 < layer-wise 80.1 < layer-wise++ 81.1 <
individual 90.5.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

LAMBDAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)


class ZooScorer:
    """Per-task accuracy of a merged model directory on one split of a zoo."""

    def __init__(self, zoo) -> None:
        self.zoo = zoo
        self.tasks = zoo.finetune_tasks

    def evaluators(self, split: str) -> list[dict]:
        from evomerge.adamerging.zoo import zoo_evaluators

        return zoo_evaluators(self.zoo, split)

    def __call__(self, model_dir: Path, split: str) -> dict[str, float]:
        from evomerge.adamerging.zoo import task_accuracy
        from evomerge.run.export import score_dir

        metrics = score_dir(model_dir, self.evaluators(split))
        return {t: task_accuracy(self.zoo, metrics, t) for t in self.tasks}


def recipe(zoo, method: str, lam: float, density: float | None = None):
    from evomerge.adamerging.zoo import merge_recipe

    return merge_recipe(zoo, method, lam, density)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", default="vision/small", help="KIND/SIZE of a zoo (built on first use)")
    parser.add_argument("--seed", type=int, default=0, help="zoo seed")
    parser.add_argument("--steps", type=int, default=500, help="AdaMerging steps")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown (for the README)")
    args = parser.parse_args()

    from evomerge.adamerging import AdaMergingSettings, adamerge
    from evomerge.adamerging.zoo import zoo_adamerging_config
    from evomerge.materialize.export import merge_to_dir
    from evomerge.zoo import build_zoo

    kind, size = args.zoo.split("/")
    zoo = build_zoo(kind, size, seed=args.seed)
    score = ZooScorer(zoo)
    rows: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    scratch = Path(tempfile.mkdtemp(prefix="adamerging-table-"))

    def merged(name: str, r) -> Path:
        out = scratch / name.replace(" ", "_").replace("/", "_")
        return out if out.exists() else merge_to_dir(r, out)  # best-lambda rows reuse the validation sweep

    def best_lambda(method: str, density: float | None) -> float:
        val = {lam: score(merged(f"{method}-{lam}", recipe(zoo, method, lam, density)), "validation")
               for lam in LAMBDAS}
        return max(LAMBDAS, key=lambda lam: sum(val[lam].values()))

    rows["weight averaging"] = score(merged("avg", recipe(zoo, "linear", 1.0)), "test")
    rows["task arithmetic (lambda 0.3)"] = score(merged("ta", recipe(zoo, "task_arithmetic", 0.3)), "test")
    lam = best_lambda("task_arithmetic", None)
    rows[f"task arithmetic (best lambda {lam})"] = score(merged(f"task_arithmetic-{lam}", recipe(zoo, "task_arithmetic", lam)), "test")
    rows["TIES top-20% (lambda 0.3)"] = score(merged("ties", recipe(zoo, "ties", 0.3, 0.2)), "test")
    lam = best_lambda("ties", 0.2)
    rows[f"TIES top-20% (best lambda {lam})"] = score(merged(f"ties-{lam}", recipe(zoo, "ties", lam, 0.2)), "test")
    config = zoo_adamerging_config(zoo)
    tasks = config.build_tasks()
    for granularity, label in (("task", "task-wise"), ("layer", "layer-wise")):
        for plus in (False, True):
            name = f"{label} AdaMerging{'++' if plus else ''}"
            start = time.perf_counter()
            result = adamerge(config.base_model, tasks, AdaMergingSettings(granularity=granularity, plus_plus=plus,
                                                                           steps=args.steps))
            seconds[name] = time.perf_counter() - start
            rows[name] = score(merged(name, result.recipe), "test")
    individual = {}
    for t in score.tasks:
        individual[t] = score(zoo.models[t], "test")[t]
    rows["individual fine-tunes"] = individual
    print_table(rows, score.tasks, seconds, args)


def print_table(rows, tasks, seconds, args) -> None:
    header = ["method", *tasks, "avg"]
    lines = []
    for name, accs in rows.items():
        avg = sum(accs.values()) / len(accs)
        extra = f" ({seconds[name]:.0f} s)" if name in seconds else ""
        lines.append([name + extra, *(f"{100 * accs[t]:.1f}" for t in tasks), f"{100 * avg:.1f}"])
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for line in lines:
            print("| " + " | ".join(line) + " |")
    else:
        width = max(len(line[0]) for line in lines)
        print(f"{'method':{width}} " + " ".join(f"{t[:8]:>8}" for t in tasks) + f" {'avg':>6}")
        for line in lines:
            print(f"{line[0]:{width}} " + " ".join(f"{v:>8}" for v in line[1:-1]) + f" {line[-1]:>6}")
    print(f"\n`python benchmarks/adamerging_table.py --zoo {args.zoo} --steps {args.steps}` (test split, accuracy %)")


if __name__ == "__main__":
    main()
