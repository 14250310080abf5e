"""Check that `evomerge merge` equals mergekit on the deterministic methods.

Runs both tools on the small (float32) LM zoo for linear, slerp,
task_arithmetic, ties, breadcrumbs, breadcrumbs_ties, model_stock and a
passthrough frankenmerge with gradient and filter parameters, and prints the
largest absolute difference per method (fp32 rounding is ~1e-7 here).
mergekit is not a dependency: point --mergekit-venv at a scratch venv with
`pip install mergekit`.

    python benchmarks/mergekit_parity.py --mergekit-venv /tmp/mkvenv [--zoo DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import evomerge_cmd, find_mergekit, timed  # noqa: E402
from merge_export import differences  # noqa: E402


def configs(zoo) -> dict[str, dict]:
    """One mergekit config per method, over the zoo's models."""
    m = {k: str(v) for k, v in zoo.models.items()}
    a, b, c = zoo.finetune_tasks[:3]
    base = m["base"]
    per = lambda params: [{"model": m[t], "parameters": dict(params)} for t in (a, b, c)]  # noqa: E731
    n = zoo.manifest["spec"]["num_layers"]
    return {
        "linear": {"merge_method": "linear", "models": per({"weight": 1.0})[:2] + [{"model": base, "parameters": {"weight": 0.5}}]},
        "slerp": {"merge_method": "slerp", "base_model": base, "models": [{"model": base}, {"model": m[a]}],
                  "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.3}]}},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base, "models": per({"weight": [0.2, 0.6]}),
                            "parameters": {"lambda": 0.8}},
        "ties": {"merge_method": "ties", "base_model": base, "models": per({"weight": 0.7, "density": [0.3, 0.8]})},
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": base, "models": per({"weight": 1.0, "density": 0.8, "gamma": 0.02})},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": base,
                             "models": per({"weight": 1.0, "density": 0.7, "gamma": 0.02})},
        "model_stock": {"merge_method": "model_stock", "base_model": base, "models": per({})},
        "passthrough": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": base, "layer_range": [0, n - 1]}]},
            {"sources": [{"model": m[b], "layer_range": [1, n]}]},
        ]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, help="LM zoo [default: build/reuse the small one]")
    parser.add_argument("--mergekit-venv", help="virtualenv holding mergekit [default: mergekit-yaml on PATH]")
    args = parser.parse_args()
    mergekit = find_mergekit(args.mergekit_venv)
    if not mergekit:
        sys.exit("mergekit-yaml not found; pass --mergekit-venv")
    from evomerge.zoo import build_zoo, load_zoo

    zoo = load_zoo(args.zoo) if args.zoo else build_zoo("lm", "small")
    with tempfile.TemporaryDirectory(prefix="evomerge-parity-") as tmp:
        tmp = Path(tmp)
        print(f"{'method':18s} {'max |diff|':>12s} {'mean |diff|':>12s}")
        for name, config in configs(zoo).items():
            path = tmp / f"{name}.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            for tool, cmd in (("evomerge", evomerge_cmd() + ["merge", str(path), str(tmp / f"{name}-evomerge")]),
                              ("mergekit", [mergekit, str(path), str(tmp / f"{name}-mergekit")])):
                run = timed(cmd)
                if run.returncode != 0:
                    sys.exit(f"{tool} failed on {name}:\n{run.stderr}")
            worst, mean = differences(tmp / f"{name}-evomerge", tmp / f"{name}-mergekit")
            print(f"{name:18s} {worst:12.3g} {mean:12.3g}")


if __name__ == "__main__":
    main()
