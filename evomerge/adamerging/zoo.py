"""AdaMerging on the embedded zoos: task configs, evaluators and baseline recipes from a zoo's manifest.

Used by the reproduction table and surrogate benchmarks and the zoo presets,
so each knows one way to turn a zoo into AdaMerging tasks and scores.
"""

from __future__ import annotations

from evomerge.adamerging.config import AdaMergingConfig
from evomerge.errors import EvomergeError
from evomerge.recipe import Recipe


def _kind(zoo) -> str:
    kind = zoo.manifest.get("kind", "lm")
    if kind not in ("lm", "vision"):
        raise EvomergeError(f"{zoo.path}: no AdaMerging support for zoo kind {kind!r}")
    return kind


def zoo_adamerging_config(zoo, **settings) -> AdaMergingConfig:
    """One AdaMerging task per fine-tune of ``zoo``, on its unlabeled split (vision: with its own head)."""
    if _kind(zoo) == "vision":
        from evomerge.zoo.vision import HEAD_PREFIX, task_split

        tasks = [{"model": str(zoo.models[t]), "unlabeled": str(task_split(zoo, t, "unlabeled")), "name": t,
                  "head": [HEAD_PREFIX]} for t in zoo.finetune_tasks]
    else:
        unlabeled = str(zoo.tasks_dir / "unlabeled.jsonl")
        tasks = [{"model": str(zoo.models[t]), "unlabeled": unlabeled, "where": {"task": t}, "name": t}
                 for t in zoo.finetune_tasks]
    return AdaMergingConfig.model_validate({"base_model": str(zoo.models["base"]), "tasks": tasks, **settings})


def zoo_evaluators(zoo, split: str) -> list[dict]:
    """Evaluator specs scoring every fine-tune task of ``zoo`` on ``split`` (validation or test)."""
    if _kind(zoo) == "vision":
        from evomerge.zoo.vision import task_split

        return [{"type": "accuracy", "name": t, "path": str(task_split(zoo, t, split)),
                 "head_from": str(zoo.models[t]), "batch_size": 512} for t in zoo.finetune_tasks]
    return [{"type": "lm_eval", "include_path": str(zoo.tasks_dir), "tasks": [f"zoo_{t}" for t in zoo.finetune_tasks],
             "split": split, "batch_size": 200}]


def task_accuracy(zoo, metrics: dict[str, float], task: str) -> float:
    """The accuracy of ``task`` among the metrics ``zoo_evaluators`` produce."""
    if _kind(zoo) == "vision":
        return metrics[f"{task}/accuracy"]
    return metrics[f"zoo_{task}/exact_match"]


def merge_recipe(zoo, method: str, lam: float, density: float | None = None) -> Recipe:
    """A baseline merge of all fine-tunes: ``linear`` (weight averaging), ``task_arithmetic`` or ``ties``.

    Task arithmetic and TIES scale the (trimmed, sign-elected) summed task
    vectors by ``lam``, as the AdaMerging paper's baselines do.
    """
    params: dict = {"weight": 1.0}
    if density is not None:
        params["density"] = density
    models = [{"model": str(zoo.models[t]), "parameters": params} for t in zoo.finetune_tasks]
    data = {"merge_method": method, "models": models, "dtype": "float32"}
    if method != "linear":
        data.update(base_model=str(zoo.models["base"]), parameters={"normalize": False, "lambda": lam})
    return Recipe.model_validate(data)
