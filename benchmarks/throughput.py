"""Search throughput: seconds per candidate, start-up to the first candidate, 1 vs 2 workers.

The shape of mergekit-evolve's published CPU figures (issue 9): a TIES genome
with 2 layer groups over a zoo's fine-tunes, scored by a 32-item two-choice
lm-eval task (64 loglikelihood requests, ``zoo_rev_choice_val``), CMA-ES with
population 12. For each zoo size it prints:

* per candidate, in one worker in this process: materialize (in place) and
  evaluate (lm-eval's ``simple_evaluate`` per candidate as the baseline, then
  ``evaluate()`` on tasks built once, then evomerge's prepared requests),
  measured on the same candidates in the same run;
* the search loop with Ray workers: wall seconds per candidate, the workers'
  own seconds, and loop overhead (the rest: Ray hand-off, optimizer ask/tell,
  journal and optimizer-state writes), candidates per minute with 1 and 2
  workers (one intra-op thread each) and with 1 worker at the default threads,
  on the 32-item task and on all 200 items (model compute limits);
* start-up to the first candidate in a fresh process (imports, run set-up, Ray
  start, worker start split into libraries / models / evaluators, first
  candidate), with Ray and with the in-process executor (``--local``).

Targets: <= 0.1 s per candidate on tiny, start-up <= 10 s, 2 workers >= 1.8x
one worker when model compute limits (needs two free cores).

    python benchmarks/throughput.py [--sizes tiny,small] [--budget 96] [--candidates 12]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASK = "zoo_rev_choice_val"
ITEMS = 32
#: every validation item of the task: per candidate the forward passes dominate (the 1 vs 2 workers target)
COMPUTE_ITEMS = 200


def space_for(zoo, *, budget: int, workers: int, name: str = "throughput", items: int = ITEMS):
    """The benchmark's search space on ``zoo``: TIES, 2 layer groups, one two-choice task of ``items`` items."""
    from evomerge.spaces.space import SearchSpace

    return SearchSpace.model_validate({
        "name": name,
        "models": {"base": str(zoo.models["base"]), "sources": [str(zoo.models[t]) for t in zoo.finetune_tasks]},
        "genome": {"type": "parameter", "method": "ties", "layer_groups": 2,
                   "genes": {"weight": [0.0, 1.0], "density": [0.1, 1.0]}, "parameters": {"normalize": False}},
        "objective": {"evaluators": [{"type": "lm_eval", "include_path": str(zoo.tasks_dir), "tasks": [TASK],
                                      "limit": items, "batch_size": min(2 * items, 64)}],
                      "fitness": [{"name": "acc", "direction": "maximize", "metrics": [f"{TASK}/acc"]}]},
        "optimizer": {"name": "cmaes", "settings": {"popsize": 12}},
        "budget": budget, "workers": workers, "seed": 0,
    })


def zoo_of(size: str):
    from evomerge.zoo import build_zoo, default_zoo_dir

    return build_zoo("lm", size, default_zoo_dir("lm", size, 0))


def per_candidate(size: str, n: int) -> dict[str, float]:
    """Mean seconds per candidate of each stage, one worker in this process, one intra-op thread."""
    import numpy as np
    from lm_eval import simple_evaluate
    from lm_eval.evaluator import evaluate

    from evomerge.recipe import Recipe
    from evomerge.run.worker import EvalWorker

    zoo = zoo_of(size)
    space = space_for(zoo, budget=n, workers=1)
    worker = EvalWorker(space.model_dump(mode="json"), 0, device="cpu", threads=1)
    info = worker.start()
    genome = space.build_genome()
    rng = np.random.default_rng(0)
    recipes = [Recipe.model_validate(genome.decode(rng.random(genome.dim)).to_dict()) for _ in range(n)]
    from lm_eval.models.huggingface import HFLM

    prepared = worker.evaluators["full"][0]._prepared
    lm = worker.evaluators["full"][0]._lm
    # the baselines get a stock wrapper, built once, and tasks built once for evaluate()
    stock = HFLM(pretrained=worker.merger.model, tokenizer=worker.tokenizer, batch_size=2 * ITEMS)
    manager = _task_manager(zoo)
    loaded = manager.load([TASK])

    def timed(fn) -> float:
        start = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):  # the stock wrapper's progress bars
            fn()
        return time.perf_counter() - start

    stages: dict[str, list[float]] = {k: [] for k in ("materialize", "simple_evaluate", "evaluate()", "prepared",
                                                      "worker.evaluate")}
    for i, recipe in enumerate(recipes):
        stages["materialize"].append(timed(lambda r=recipe: worker.merger.materialize(r)))
        stages["simple_evaluate"].append(timed(lambda: simple_evaluate(
            model=stock, tasks=[TASK], task_manager=manager, limit=ITEMS, bootstrap_iters=0, verbosity="ERROR")))
        stages["evaluate()"].append(timed(lambda: evaluate(lm=stock, task_dict=loaded, limit=ITEMS, log_samples=False,
                                                           bootstrap_iters=0, verbosity="ERROR")))
        stages["prepared"].append(timed(lambda: prepared.score(lm)))
        stages["worker.evaluate"].append(timed(lambda i=i, r=recipe: worker.evaluate(i, r.to_dict())))
    # the first candidate warms caches (memoized tokens, first-call kernels); report the steady state
    out = {k: statistics.mean(v[1:]) for k, v in stages.items()}
    out["requests"] = prepared.num_requests
    out["worker_startup"] = info["startup"]
    return out


def _task_manager(zoo):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(zoo.tasks_dir), include_defaults=False)


def search_loop(size: str, workers: int, budget: int, threads: int | None, items: int = ITEMS) -> dict[str, float]:
    """A real search with Ray workers: wall seconds per candidate, worker seconds, candidates per minute."""
    from evomerge.run.executor import RayExecutor
    from evomerge.run.rundir import RunDir
    from evomerge.run.runner import Runner

    space = space_for(zoo_of(size), budget=budget, workers=workers, items=items)
    run = RunDir.create(Path(tempfile.mkdtemp(prefix="evomerge-throughput-")) / "run", space)
    progress = Runner(run, lambda s: RayExecutor(s.model_dump(mode="json"), workers, threads=threads)).run()
    seconds = [e.seconds for e in run.journal()]
    failed = sum(not e.ok for e in run.journal())
    if failed:
        raise SystemExit(f"{failed} candidates failed; see {run.path}")
    wall = progress.loop_seconds / len(seconds)
    return {"wall": wall, "worker": statistics.mean(seconds), "per_min": 60.0 / wall,
            "overhead": progress.loop_seconds * workers / len(seconds) - statistics.mean(seconds)}


def startup(size: str, local: bool) -> dict:
    """Start-up stages of a fresh ``python`` process running a 1-candidate search (see ``_startup_child``)."""
    cmd = [sys.executable, __file__, "--startup-child", size] + (["--local"] if local else [])
    began = time.time()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode:
        raise SystemExit(f"start-up probe failed:\n{proc.stderr[-2000:]}")
    marks = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"marks": {k: v - began for k, v in marks.items() if k != "worker"}, "worker": marks["worker"]}


def _startup_child(size: str, local: bool) -> None:
    """Run one candidate from a cold process and print the wall-clock time of each stage as JSON."""
    marks: dict = {"process": time.time()}  # interpreter up (the parent measures from before the spawn)
    from evomerge.run.executor import LocalExecutor, RayExecutor
    from evomerge.run.rundir import RunDir
    from evomerge.run.runner import Runner

    space = space_for(zoo_of(size), budget=1, workers=1)
    run = RunDir.create(Path(tempfile.mkdtemp(prefix="evomerge-startup-")) / "run", space)

    def factory(space):
        marks["imports, space, optimizer"] = time.time()
        data = space.model_dump(mode="json")
        executor = LocalExecutor(data, device="cpu") if local else RayExecutor(data, 1)
        marks["executor (Ray start)"] = time.time()
        start = executor.start

        def timed_start():
            infos = start()
            marks["worker"] = infos[0]["startup"]
            marks["worker started"] = time.time()
            return infos

        executor.start = timed_start
        return executor

    def on_event(progress):
        if progress.done and "first candidate" not in marks:
            marks["first candidate"] = time.time()

    Runner(run, factory, on_event=on_event).run()
    print(json.dumps(marks))


def main() -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--budget", type=int, default=96, help="candidates per search-loop run")
    parser.add_argument("--candidates", type=int, default=12, help="candidates for the in-process split")
    parser.add_argument("--startup-child", help=argparse.SUPPRESS)
    parser.add_argument("--local", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.startup_child:
        _startup_child(args.startup_child, args.local)
        return

    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    for size in args.sizes.split(","):
        zoo_of(size)  # build once, outside the timings
        print(f"\n== {size} zoo: TIES, 2 layer groups, {TASK} ({ITEMS} items), CMA-ES popsize 12 ==")
        split = per_candidate(size, args.candidates)
        base = split["simple_evaluate"]
        print(f"per candidate, in process, 1 thread ({split['requests']} loglikelihood requests), "
              f"mean of {args.candidates - 1}:")
        print(f"  materialize (in place)            {split['materialize']:.4f} s")
        for name in ("simple_evaluate", "evaluate()", "prepared"):
            label = {"simple_evaluate": "evaluate: lm-eval simple_evaluate", "evaluate()": "evaluate: lm-eval evaluate()",
                     "prepared": "evaluate: prepared requests"}[name]
            print(f"  {label:<33} {split[name]:.4f} s   {base / split[name]:5.1f}x vs simple_evaluate")
        print(f"  worker.evaluate (both + checks)   {split['worker.evaluate']:.4f} s")

        # the tiny zoo's tasks have 32 validation items: no compute-bound setting there
        for items in (ITEMS,) if size == "tiny" else (ITEMS, COMPUTE_ITEMS):
            loops = {}
            for label, workers, threads in (("1 worker, 1 thread", 1, 1), ("2 workers, 1 thread each", 2, 1),
                                            ("1 worker, default threads", 1, None)):
                loops[label] = search_loop(size, workers, args.budget, threads, items)
            one = loops["1 worker, 1 thread"]["per_min"]
            print(f"search loop with Ray ({args.budget} candidates each, {items} items per candidate"
                  + (", model compute limits" if items == COMPUTE_ITEMS else "") + "):")
            print(f"  {'':<26} {'wall/cand':>10} {'worker/cand':>12} {'overhead':>9} {'cand/min':>9} "
                  f"{'vs 1 worker':>12}")
            for label, r in loops.items():
                print(f"  {label:<26} {r['wall']:>8.4f} s {r['worker']:>10.4f} s {r['overhead']:>7.4f} s "
                      f"{r['per_min']:>9.0f} {r['per_min'] / one:>11.2f}x")

        for local in (False, True):
            s = startup(size, local)
            marks, prev, parts = s["marks"], 0.0, []
            for stage, at in sorted(marks.items(), key=lambda kv: kv[1]):
                parts.append(f"{stage} +{at - prev:.1f}")
                prev = at
            worker = ", ".join(f"{k} {v:.1f}" for k, v in s["worker"].items())
            print(f"start-up to first candidate ({'in process' if local else 'Ray, 1 worker'}): "
                  f"{marks['first candidate']:.1f} s")
            print(f"  {' | '.join(parts)}")
            print(f"  worker start: {worker} s")


if __name__ == "__main__":
    main()
