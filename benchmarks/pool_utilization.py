"""Worker utilization of the search loop when evaluation times vary 10x between candidates.

Runs real searches on the tiny zoo with a local Ray cluster and an evaluator
that sleeps a seeded random 0.2-2.0 s per candidate (a 10x spread; sleeping
keeps the CPU free so the figures measure the loop, not CPU contention), and
prints per optimizer:

* busy fraction: seconds workers spent evaluating / (workers x loop wall time)
  — target >= 90% for asynchronous optimizers;
* loop overhead per candidate: idle worker-seconds per evaluation, as a share
  of the mean evaluation time — target <= 5%.

pycma is generational, so its idle time at generation ends shows up here (see
docs/search.md); Optuna's TPE and random search are asynchronous.

    python benchmarks/pool_utilization.py [--workers 2] [--budget 40]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path


SLEEPER = '''
import random, time
_rng = random.Random(0)
def score(model, tokenizer):
    seconds = _rng.uniform(0.2, 2.0)
    time.sleep(seconds)
    return {"score": seconds}
'''


def main() -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's per-candidate bars would drown the table
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--optimizers", default="tpe,random,cmaes")
    args = parser.parse_args()

    from evomerge.run.executor import RayExecutor
    from evomerge.run.rundir import RunDir
    from evomerge.run.runner import Runner
    from evomerge.spaces.space import SearchSpace
    from evomerge.zoo import build_zoo, default_zoo_dir

    zoo = build_zoo("lm", "tiny", default_zoo_dir("lm", "tiny", 0))
    tmp = Path(tempfile.mkdtemp(prefix="evomerge-pool-"))
    (tmp / "sleeper.py").write_text(SLEEPER)
    print(f"{args.workers} workers, {args.budget} evaluations each, evaluation time 0.2-2.0 s (10x spread)")
    print(f"{'optimizer':<10} {'busy':>7} {'overhead/cand':>14} {'of mean eval':>13} {'wall s':>8}")
    for name in args.optimizers.split(","):
        space = SearchSpace.model_validate({
            "name": f"pool-{name}",
            "models": {"base": str(zoo.models["base"]), "sources": [str(zoo.models[m]) for m in ("copy", "rev", "sort")]},
            "genome": {"type": "parameter", "method": "task_arithmetic"},
            "objective": {"evaluators": [{"type": "python", "function": f"{tmp / 'sleeper.py'}:score"}],
                          "fitness": [{"name": "score", "direction": "minimize", "metrics": ["score"]}]},
            "optimizer": {"name": name, "settings": {"popsize": 8} if name == "cmaes" else {}},
            "budget": args.budget, "workers": args.workers, "seed": 0,
        })
        run = RunDir.create(tmp / name, space)
        progress = Runner(run, lambda s: RayExecutor(s.model_dump(mode="json"), s.workers)).run()
        seconds = [e.seconds for e in run.journal()]
        capacity = args.workers * progress.loop_seconds
        busy = sum(seconds) / capacity
        overhead = (capacity - sum(seconds)) / len(seconds)
        print(f"{name:<10} {busy:>7.1%} {overhead:>12.3f} s {overhead / statistics.mean(seconds):>13.1%} "
              f"{progress.loop_seconds:>8.1f}")
    print(f"run dirs under {tmp}")


if __name__ == "__main__":
    main()
