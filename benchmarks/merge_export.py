"""Export speed and memory: TIES of 3 fine-tunes onto the base of the `medium` zoo.

Runs `evomerge merge` and, when mergekit is available (on PATH or in the venv
given by --mergekit-venv), `mergekit-yaml` on the same config in the same run,
each as a fresh process, and prints wall time, peak RSS and the ratios. Both
outputs are compared tensor by tensor (mergekit computes in bf16, evomerge in
fp32, so small differences are expected).

    python benchmarks/merge_export.py [--zoo DIR] [--mergekit-venv /path/to/venv] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import evomerge_cmd, find_mergekit, timed  # noqa: E402

from evomerge.io.model_dir import ModelDir  # noqa: E402


def ties_recipe(zoo) -> dict:
    """The benchmark's merge: TIES, density 0.5, weight 1, bf16, all fine-tunes onto the base."""
    models = zoo.models
    return {
        "merge_method": "ties",
        "base_model": str(models["base"]),
        "models": [{"model": str(models[t]), "parameters": {"weight": 1.0, "density": 0.5}} for t in zoo.finetune_tasks],
        "parameters": {"normalize": True},
        "dtype": "bfloat16",
    }


def differences(a: Path, b: Path) -> tuple[float, float]:
    """Largest and mean absolute difference between two merged model directories."""
    ma, mb = ModelDir(a), ModelDir(b)
    worst, total, count = 0.0, 0.0, 0
    for name in ma.names:
        diff = (ma.tensor(name).float() - mb.tensor(name).float()).abs()
        worst = max(worst, float(diff.max()))
        total += float(diff.sum())
        count += diff.numel()
    return worst, total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, help="medium LM zoo directory [default: build/reuse the cached one]")
    parser.add_argument("--mergekit-venv", help="virtualenv holding mergekit [default: mergekit-yaml on PATH]")
    parser.add_argument("--repeats", type=int, default=1, help="runs per tool (the median is reported)")
    parser.add_argument("--threads", type=int, default=2, help="evomerge --threads")
    args = parser.parse_args()

    from evomerge.zoo import build_zoo, load_zoo

    zoo = load_zoo(args.zoo) if args.zoo else build_zoo("lm", "medium")
    params = sum(math.prod(info.shape) for info in ModelDir(zoo.models["base"]).infos.values())
    mergekit = find_mergekit(args.mergekit_venv)
    with tempfile.TemporaryDirectory(prefix="evomerge-bench-") as tmp:
        tmp = Path(tmp)
        config = tmp / "ties.yaml"
        config.write_text(yaml.safe_dump(ties_recipe(zoo), sort_keys=False))
        tools = {"evomerge": evomerge_cmd() + ["merge", str(config), str(tmp / "evomerge"), "--force",
                                               "--threads", str(args.threads)]}
        if mergekit:
            tools["mergekit"] = [mergekit, str(config), str(tmp / "mergekit")]
        results: dict[str, list] = {name: [] for name in tools}
        for _ in range(args.repeats):
            for name, cmd in tools.items():  # interleaved, so machine noise hits both alike
                run = timed(cmd)
                if run.returncode != 0:
                    sys.exit(f"{name} failed:\n{run.stderr}")
                results[name].append(run)
        print(f"TIES of {len(zoo.finetune_tasks)} fine-tunes onto the base, {params / 1e6:.0f}M parameters, bf16, "
              f"{args.repeats} run(s) each, median shown")
        print(f"{'tool':10s} {'wall s':>8s} {'peak RSS MB':>12s}")
        med = {}
        for name, runs in results.items():
            med[name] = (statistics.median(r.seconds for r in runs), statistics.median(r.peak_rss_mb for r in runs))
            print(f"{name:10s} {med[name][0]:8.2f} {med[name][1]:12.0f}")
        if "mergekit" in med:
            speed = med["mergekit"][0] / med["evomerge"][0]
            memory = med["evomerge"][1] / med["mergekit"][1]
            print(f"evomerge is {speed:.1f}x faster than mergekit, at {memory:.2f}x its peak RSS")
            worst, mean = differences(tmp / "evomerge", tmp / "mergekit")
            print(f"|evomerge - mergekit| over all weights: max {worst:.3g}, mean {mean:.3g} "
                  "(mergekit computes in bf16 and breaks ties at the TIES cut arbitrarily)")
        else:
            print("mergekit not found (pass --mergekit-venv or put mergekit-yaml on PATH): no ratio")


if __name__ == "__main__":
    main()
