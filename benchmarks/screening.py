"""Does surrogate screening reach a better fitness than no screening in the same wall time?

Runs the given search space (it must have a ``surrogate`` section) with and
without screening, for several seeds, each for the same number of wall-clock
seconds (one in-process worker, so both arms get the same CPU), and prints the
best fully evaluated fitness each arm reached.

    python benchmarks/screening.py search_spaces/zoo-small-ties-screened.yaml --seconds 60 --seeds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


class TimeUp(Exception):
    """Raised from the progress callback to end a run at its wall-time budget."""


def run_for(space, seconds: float, workdir: Path) -> tuple[float, int, int]:
    """Best fitness, full evaluations and screened candidates after ``seconds`` of searching."""
    from evomerge.run.executor import LocalExecutor
    from evomerge.run.rundir import RunDir
    from evomerge.run.runner import Runner, ranked

    run = RunDir.create(workdir, space)
    start = time.monotonic()

    def on_event(progress) -> None:
        if time.monotonic() - start > seconds:
            raise TimeUp

    try:
        Runner(run, lambda s: LocalExecutor(s.model_dump(mode="json")), on_event=on_event).run()
    except TimeUp:
        pass
    journal = run.journal()
    best = ranked(journal, space.objective.directions)
    sign = 1.0 if space.objective.directions[0] == "maximize" else -1.0
    return (sign * best[0].fitness[0] if best else float("nan"), sum(not e.screened for e in journal),
            sum(e.screened for e in journal))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("space", type=Path)
    parser.add_argument("--seconds", type=float, default=60.0, help="wall time per run (start-up included)")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()

    from evomerge.spaces.space import SearchSpace

    screened = SearchSpace.from_file(args.space)
    if screened.surrogate is None:
        raise SystemExit(f"{args.space}: no surrogate section")
    screened = screened.with_overrides(budget=100_000).resolved(relative_to=args.space.parent)
    plain = screened.model_copy(update={"surrogate": None})
    scratch = Path(tempfile.mkdtemp(prefix="screening-"))
    results: dict[str, list[float]] = {"no screening": [], "screening": []}
    print(f"{args.space.name}: {args.seconds:.0f} s per run, keep {screened.surrogate.keep}, "
          f"optimizer {screened.optimizer.name}")
    for seed in range(args.seeds):
        for label, space in (("no screening", plain), ("screening", screened)):
            best, full, skipped = run_for(space.with_overrides(seed=seed), args.seconds, scratch / f"{label}-{seed}")
            results[label].append(best)
            print(f"seed {seed} {label:13} best {best:.4f}  ({full} full evaluations, {skipped} screened)", flush=True)
    for label, values in results.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{label:13} mean best {statistics.mean(values):.4f} ± {spread:.4f} over {len(values)} seeds")


if __name__ == "__main__":
    main()
