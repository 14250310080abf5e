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

    def averages(self) -> dict[str, float]:
        return {m: sum(row[t] for t in self.tasks) / len(self.tasks) for m, row in self.table.items()}


def _load_state(path, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return {k: v.detach() for k, v in model.state_dict().items()}


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

    One live model and one lm-eval wrapper are reused: each candidate's weights
    are copied into the model in place before its evaluation.
    """
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.methods.registry import apply_method

    say = progress or log.info
    models = zoo.models
    finetunes = zoo.finetune_tasks
    tokenizer = AutoTokenizer.from_pretrained(str(models["base"]))
    live = AutoModelForCausalLM.from_pretrained(str(models["base"]), dtype=torch.float32).eval()
    lm = HFLM(pretrained=live, tokenizer=tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=str(zoo.tasks_dir), include_defaults=False)
    names = [task_name(t, split) for t in finetunes]

    states = {name: _load_state(models[name], torch.float32) for name in ["base", *finetunes]}

    def score(label: str, state) -> dict[str, float]:
        say(f"lm-eval: {label}")
        live.load_state_dict(state)
        out = simple_evaluate(
            model=lm,
            tasks=names,
            task_manager=manager,
            limit=limit,
            log_samples=False,
            bootstrap_iters=0,
            verbosity="ERROR",
        )
        return {t: float(out["results"][n]["exact_match,none"]) for t, n in zip(finetunes, names)}

    table = {name: score(name, states[name]) for name in ["base", *finetunes]}
    base = states["base"]
    for label, method, per_model, global_params in merges:
        merged = {
            k: apply_method(
                method,
                base[k],
                [states[t][k] for t in finetunes],
                [dict(per_model) for _ in finetunes],
                global_params,
            )
            for k in base
        }
        table[label] = score(label, merged)
    return CheckResult(split, finetunes, table, verify(table, finetunes))
