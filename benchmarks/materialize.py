"""Per-candidate materialization: resident in-place vs disk round-trip, plus one lm-eval scoring.

For the small and medium LM zoos, times a few candidates of each method
(TIES and task arithmetic by default) in the same run:
`ResidentMerger.materialize` (in place into one live model; blockwise with the
pool on the device -- on a CPU both with the compiled kernels of
`materialize.fused`, the default where the model is large enough, and without
them --, the per-tensor export kernels on the same pool, blockwise with the
pool read from disk per candidate) and the disk round trip a search without
it would do (`evomerge merge` to a temp dir, then `from_pretrained`). Prints
seconds per candidate, ratios against the disk round trip, the effective
memory traffic, the memory plan and the magnitude indexes' size. The last row
is the machine's ceiling: one compiled pass that reads the resident base and
sources and writes a model (a weighted sum, the least any merge does), so its
ratio bounds what any materialization can reach on this machine. On the small
zoo it also times one lm-eval scoring of a candidate (first method) and
splits it into model forward time and harness overhead.

    python benchmarks/materialize.py [--sizes small medium] [--methods ties task_arithmetic] [--candidates 3]
                                     [--device cuda] [--no-eval]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def candidate(zoo, method: str, density: float, weight: float):
    """A ``method`` merge of the zoo's fine-tunes onto its base (``density`` where the method trims)."""
    from evomerge.methods.registry import get_method
    from evomerge.recipe import Recipe

    m = {k: str(v) for k, v in zoo.models.items()}
    trims = "density" in get_method(method).source_params
    params = {"weight": weight, "density": density} if trims else {"weight": weight}
    return Recipe.model_validate({
        "merge_method": method, "base_model": m["base"],
        "models": [{"model": m[t], "parameters": params} for t in zoo.finetune_tasks],
    })


def synchronize(device: str) -> None:
    """Wait for the device's queued kernels, so a timer stops when the work is done, not when it is queued."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def per_candidate(fn, recipes, device: str) -> float:
    # warm-up: builds the magnitude indexes, and compiles the fused kernels' variants these candidates
    # take (per source count and cut pattern; a search pays each once per worker, in its first candidates)
    for r in recipes:
        fn(r)
    synchronize(device)
    start = time.perf_counter()
    for r in recipes:
        fn(r)
    synchronize(device)
    return (time.perf_counter() - start) / len(recipes)


def ceiling(merger, sources) -> callable:
    """One pass over the pool per candidate: ``base + sum(w * (source - base))``, block by block.

    Compiled where ``torch.compile`` works (one read of every input, one write),
    eager otherwise; the bound a candidate's materialization cannot beat.
    """
    import torch

    def weighted_sum(base, rows, weight):
        b = base.float()
        total = b
        for i, row in enumerate(rows):
            total = total + (row.float() - b) * weight[i]
        return total.to(base.dtype)

    try:
        kernel = torch.compile(weighted_sum, dynamic=True)
    except Exception:  # noqa: BLE001 -- no compiler: the eager passes still bound from above
        kernel = weighted_sum
    base = merger.pool[merger.base]
    pool = [merger.pool[str(s)] for s in sources]

    def run(recipe) -> None:
        # a tensor, not floats: dynamo would compile again for every new weight
        weight = torch.tensor([float(m.parameters["weight"]) for m in recipe.models], device=merger.device)
        for b in range(len(base.blocks)):
            kernel(base.block(b), [p.block(b) for p in pool], weight)

    return run


def bench_size(size: str, method: str, n: int, device: str, evaluate: bool) -> None:
    from transformers import AutoModelForCausalLM

    from evomerge.materialize.export import merge_to_dir
    from evomerge.materialize.plan import plan_merge
    from evomerge.materialize.pool import BLOCK_NUMEL, default_block_numel
    from evomerge.materialize.resident import ResidentMerger
    from evomerge.zoo import build_zoo

    zoo = build_zoo("lm", size)
    recipes = [candidate(zoo, method, 0.2 + 0.7 * i / max(1, n - 1), 0.5 + 0.1 * i) for i in range(n)]
    sources = [zoo.models[t] for t in zoo.finetune_tasks]
    start = time.perf_counter()
    merger = ResidentMerger(zoo.models["base"], sources, device=device)
    synchronize(device)
    setup = time.perf_counter() - start
    rows = [("resident, blockwise (device)", per_candidate(merger.materialize, recipes, device))]
    if device == "cpu":  # the other CPU route: eager passes where the compiled kernels are the default, or these
        other = ResidentMerger(zoo.models["base"], sources, device=device, fused=not merger.fused)
        label = "  same, eager passes" if merger.fused else "  same, fused kernels"
        rows.append((label, per_candidate(other.materialize, recipes, device)))
        del other
    # the per-tensor route (export's kernels, job by job) on the same resident pool
    rows.append(("resident, per-tensor jobs", per_candidate(
        lambda r: merger._write(plan_merge(r, merger.pool), r, None), recipes, device)))
    if default_block_numel(device) != BLOCK_NUMEL:  # what the larger CUDA blocks save in launches
        small_blocks = ResidentMerger(zoo.models["base"], sources, device=device, block_numel=BLOCK_NUMEL)
        rows.append((f"  same, {BLOCK_NUMEL >> 20}M-entry blocks", per_candidate(small_blocks.materialize, recipes, device)))
        del small_blocks
    # the other placements a model too large for the device would get (host memory is the device on a CPU)
    for placement in (["host"] if device.startswith("cuda") else []) + ["disk"]:
        streamed = ResidentMerger(zoo.models["base"], sources, device=device, placement=placement)
        rows.append((f"resident, blockwise ({placement})", per_candidate(streamed.materialize, recipes, device)))
        del streamed
    index_bytes = sum(i.nbytes for i in merger._indexes.values())
    pool_bytes = merger.memory.pool_bytes
    with tempfile.TemporaryDirectory(prefix="evomerge-bench-") as tmp:
        start = time.perf_counter()
        for i, r in enumerate(recipes):
            out = merge_to_dir(r, Path(tmp) / f"c{i}", device=device)
            AutoModelForCausalLM.from_pretrained(str(out)).to(device)
        synchronize(device)
        disk = (time.perf_counter() - start) / n
    rows.append(("disk round trip", disk))
    rows.append(("ceiling: one read-write pass", per_candidate(ceiling(merger, sources), recipes, device)))
    model_bytes = sum(p.numel() * p.element_size() for p in merger.model.parameters())
    traffic = model_bytes * (len(zoo.finetune_tasks) + 2)  # read base + sources, write the live model
    params = sum(p.numel() for p in merger.model.parameters())
    print(f"[{size}] {params / 1e6:.1f}M params ({next(merger.model.parameters()).dtype}), "
          f"{method} of {len(zoo.finetune_tasks)}, {n} candidates on {device}; resident setup {setup:.2f} s")
    print(f"  {merger.memory.describe()}")
    print(f"  magnitude indexes: {index_bytes / 1e6:.2f} MB = {100 * index_bytes / pool_bytes:.2f}% of the pool")
    for label, seconds in rows:
        print(f"  {label:30s}: {seconds * 1000:8.1f} ms/candidate  {disk / seconds:6.1f}x vs disk round trip"
              f"  ({traffic / seconds / 1e9:.2f} GB/s effective)")
    if size == "small" and evaluate:
        bench_eval(zoo, merger)


def bench_eval(zoo, merger) -> None:
    import torch

    from evomerge.evaluation import build_evaluator

    tasks = [f"zoo_{t}" for t in zoo.finetune_tasks]
    ev = build_evaluator({"type": "lm_eval", "tasks": tasks, "include_path": str(zoo.tasks_dir), "batch_size": 64})
    start = time.perf_counter()
    ev.setup(merger.model, merger_tokenizer(zoo))
    setup = time.perf_counter() - start
    model = merger.model
    forward = [0.0]
    original = model.forward

    def timed_forward(*args, **kwargs):
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            forward[0] += time.perf_counter() - t

    model.forward = timed_forward
    try:
        with torch.no_grad():
            start = time.perf_counter()
            metrics = ev(model, merger_tokenizer(zoo))
            total = time.perf_counter() - start
    finally:
        model.forward = original
    print(f"  lm_eval on {len(tasks)} tasks x 200 validation items: {total:.2f} s per candidate "
          f"(model forward {forward[0]:.2f} s, harness {total - forward[0]:.2f} s); setup once {setup:.2f} s")
    print("  " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))


def merger_tokenizer(zoo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(zoo.models["base"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["small", "medium"])
    parser.add_argument("--methods", nargs="+", default=["ties", "task_arithmetic"])
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--device", default=None, help="cuda when a GPU is present, else cpu")
    parser.add_argument("--no-eval", action="store_true", help="skip the lm-eval scoring on the small zoo")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for size in args.sizes:
        for k, method in enumerate(args.methods):
            bench_size(size, method, args.candidates, device, evaluate=not args.no_eval and k == 0)


if __name__ == "__main__":
    main()
