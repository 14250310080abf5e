"""`evomerge zoo check`: score a zoo's models and simple merges with real lm-eval runs.

The table this prints is the zoo's contract: every fine-tune beats the base on
its own task, and some simple merge beats every single source on the average.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from evomerge.zoo.lm import verify
from evomerge.zoo.lmeval_tasks import task_name
from evomerge.zoo.registry import ZooInfo

log = logging.getLogger(__name__)

#: The merges `zoo check` scores besides the source models: (label, method, per-model params, global params).
DEFAULT_MERGES: tuple[tuple[str, str, dict, dict], ...] = (
    ("task_arithmetic(lambda=0.3)", "task_arithmetic", {"weight": 1.0}, {"lambda": 0.3}),
    ("task_arithmetic(lambda=0.5)", "task_arithmetic", {"weight": 1.0}, {"lambda": 0.5}),
    ("task_arithmetic(lambda=1.0)", "task_arithmetic", {"weight": 1.0}, {"lambda": 1.0}),
    ("ties(density=0.5, lambda=0.5)", "ties", {"weight": 1.0, "density": 0.5}, {"lambda": 0.5}),
)


@dataclass
class CheckResult:
    """Per-model per-task exact match from lm-eval, plus the acceptance verdict."""

    split: str
    tasks: list[str]
    table: dict[str, dict[str, float]]
    verdict: dict


def check_zoo(
    zoo: ZooInfo,
    *,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 64,
    merges: Sequence[tuple[str, str, dict, dict]] = DEFAULT_MERGES,
    progress: Callable[[str], None] | None = None,
) -> CheckResult:
    """Score base, fine-tunes and ``merges`` of ``zoo`` on ``split`` with lm-eval.

    Every candidate, sources included, is a recipe materialized in place into
    one live model by a ResidentMerger and scored by one lm_eval evaluator, as
    a search scores its candidates.
    """
    from transformers import AutoTokenizer

    from evomerge.evaluation import build_evaluator
    from evomerge.materialize.resident import ResidentMerger
    from evomerge.recipe import Recipe

    say = progress or log.info
    models = {name: str(path) for name, path in zoo.models.items()}
    finetunes = zoo.finetune_tasks
    merger = ResidentMerger(models["base"], [models[t] for t in finetunes])
    tokenizer = AutoTokenizer.from_pretrained(models["base"])
    names = {t: task_name(t) for t in finetunes}
    evaluator = build_evaluator({"type": "lm_eval", "tasks": list(names.values()), "include_path": str(zoo.tasks_dir),
                                 "split": split, "limit": limit, "batch_size": batch_size, "metric": "exact_match"})

    def score(label: str, recipe: dict) -> dict[str, float]:
        say(f"lm-eval: {label}")
        model = merger.materialize(Recipe.model_validate(recipe))
        metrics = evaluator(model, tokenizer)
        return {t: metrics[f"{n}/exact_match"] for t, n in names.items()}

    def alone(name: str) -> dict:
        return {"merge_method": "passthrough", "models": [{"model": models[name]}]}

    table = {name: score(name, alone(name)) for name in ["base", *finetunes]}
    for label, method, per_model, global_params in merges:
        table[label] = score(label, {
            "merge_method": method, "base_model": models["base"], "parameters": dict(global_params),
            "models": [{"model": models[t], "parameters": dict(per_model)} for t in finetunes],
        })
    return CheckResult(split, finetunes, table, verify(table, finetunes))
