"""``evomerge adamerge``: train coefficients from a config and export the merged model."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from evomerge.adamerging.config import AdaMergingConfig
from evomerge.adamerging.train import AdaMergingResult, adamerge
from evomerge.device import check_device
from evomerge.errors import EvomergeError
from evomerge.fsutil import check_replaceable
from evomerge.recipe import Recipe

#: What the exported directory holds besides the model: coefficients, losses, settings.
REPORT_FILE = "adamerging.json"


def recipe_of_run(path: Path) -> Recipe:
    """The best candidate's recipe of a search run (the last stage of a staged run)."""
    from evomerge.run.export import choose
    from evomerge.run.rundir import RunDir
    from evomerge.run.staged import latest_run

    run = latest_run(RunDir.open(path))
    return Recipe.model_validate(choose(run).recipe)


def adamerge_to_dir(config: AdaMergingConfig, out_dir: Path, *, init_run: Path | None = None, force: bool = False,
                    device: str | None = None, progress: Callable[[str, int, int, float], None] | None = None,
                    inputs: Sequence[Path] = ()) -> AdaMergingResult:
    """Train AdaMerging coefficients for a resolved ``config`` and write the merged model to ``out_dir``.

    ``init_run`` starts from a search run's best recipe. ``progress`` gets
    (phase, step, steps, loss). The directory holds the model (weights,
    config, tokenizer, ``recipe.yaml``, model card) and ``adamerging.json``;
    it is written to a temp path and renamed, so a failure leaves nothing.
    """
    from evomerge.materialize.export import merge_to_dir

    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise EvomergeError(f"{out_dir}: already exists; pass --force to replace it")
    if device is not None:
        check_device(device)
    # the unlabeled data is read during training only: merge_to_dir would not know to keep it
    inputs = [*inputs, *([init_run] if init_run is not None else []), *(Path(t.unlabeled) for t in config.tasks)]
    if out_dir.exists():  # before training, not after
        check_replaceable(out_dir, [*inputs, Path(config.base_model), *(Path(t.model) for t in config.tasks)])
    init = recipe_of_run(init_run) if init_run is not None else None
    tasks = config.build_tasks()
    result = adamerge(config.base_model, tasks, config.settings, init=init, device=device,
                      progress=None if progress is None else lambda i, n, loss: progress("training", i, n, loss))
    report = {
        "settings": config.settings.model_dump(),
        "init_run": str(init_run) if init_run is not None else None,
        "tasks": [t.name for t in tasks],
        "sources": result.sources,
        "groups": result.groups,
        "coefficients": [[round(float(v), 6) for v in row] for row in result.coefficients],
        "entropy": {"initial": result.initial_entropy, "final": result.final_entropy},
        "losses": result.losses,
        "stopped": result.stopped,
    }

    def finalize(tmp: Path) -> None:
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")

    merge_to_dir(result.recipe, out_dir, force=force, finalize=finalize, inputs=inputs,
                 progress=None if progress is None else lambda done, total: progress("exporting", done, total, 0.0))
    return result
