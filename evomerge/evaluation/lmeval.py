"""lm-eval tasks scored in process on the live model."""

from __future__ import annotations

import logging
from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.evaluation.base import Evaluator, check_counts
from evomerge.evaluation.registry import register

log = logging.getLogger(__name__)
SPLITS = ("validation", "test")


@register
class LMEvalEvaluator(Evaluator):
    """Runs lm-eval tasks on the live model; metrics are named ``task/metric``.

    Set up once per worker: one ``TaskManager`` restricted to ``include_path``
    (no scan of lm-eval's bundled tasks), the tasks and their requests built once
    (documents, prompts and few-shot contexts; see ``PreparedTasks``), and one
    ``HFLM`` wrapper around the live model with the batch size set on the wrapper
    (``simple_evaluate`` ignores its own ``batch_size`` for model instances). Per
    candidate only the model answers the kept requests. lm-eval's response cache
    is never used: it would hand one merge another merge's answers. ``split``
    picks the documents scored: ``validation`` during search, ``test`` for
    reports. Scores equal ``simple_evaluate``'s with the same settings.
    """

    name = "lm_eval"

    def __init__(self, tasks: list[str] | str, include_path: str | None = None, split: str = "validation",
                 limit: int | None = None, batch_size: int = 32, num_fewshot: int | None = None,
                 metric: str | None = None) -> None:
        if split not in SPLITS:
            raise EvomergeError(f"lm_eval: split must be one of {', '.join(SPLITS)}, not {split!r}")
        if isinstance(tasks, str):  # "a,b" as lm_eval's --tasks takes it
            tasks = [t.strip() for t in tasks.split(",") if t.strip()]
        if not tasks:
            raise EvomergeError("lm_eval: no tasks given")
        check_counts("lm_eval", limit=(limit, 1), batch_size=(batch_size, 1), num_fewshot=(num_fewshot, 0))
        self.task_names = list(tasks)
        self.include_path = include_path
        self.split = split
        self.limit = limit
        self.batch_size = batch_size
        self.num_fewshot = num_fewshot
        self.metric = metric
        self._lm = None
        self._prepared = None

    def setup(self, model, tokenizer) -> None:
        from lm_eval.tasks import TaskManager

        from evomerge.evaluation.lmeval_prepared import PreparedTasks, wrap_model

        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise EvomergeError(f"lm_eval: include_path {self.include_path} is not a directory")
        manager = TaskManager(include_path=self.include_path, include_defaults=self.include_path is None)
        unknown = [t for t in self.task_names if t not in manager.all_tasks]
        if unknown:
            raise EvomergeError(
                f"lm_eval: unknown task {unknown[0]!r}"
                + (f" in {self.include_path}" if self.include_path else "")
                + f"; available: {', '.join(sorted(manager.all_tasks)[:20])}"
                + "".join(f"; {file} does not parse ({why})" for file, why in _unparsable(self.include_path)[:1])
            )
        try:
            loaded = manager.load(self.task_names)
        except Exception as exc:  # lm-eval raises assorted types for bad YAML / data
            raise EvomergeError(f"lm_eval: cannot load tasks {self.task_names}: {exc}") from exc
        if loaded["groups"]:
            raise EvomergeError(f"lm_eval: {sorted(loaded['groups'])[0]!r} is a group; list its tasks instead")
        for name, task in loaded["tasks"].items():
            self._select_split(name, task)
            if self.num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=self.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
        try:
            self._prepared = PreparedTasks(loaded["tasks"], self.limit)
        except Exception as exc:  # documents or templates lm-eval cannot turn into requests
            raise EvomergeError(f"lm_eval: cannot build the requests of {self.task_names}: {exc}") from exc
        for name, task in loaded["tasks"].items():
            if self.metric is not None and self.metric not in task.aggregation():
                raise EvomergeError(f"lm_eval: metric {self.metric!r} is not one of task {name!r}'s "
                                    f"({', '.join(task.aggregation())})")
        self._lm = wrap_model(model, tokenizer, self.batch_size)

    def _select_split(self, name: str, task) -> None:
        """Make ``eval_docs`` return the chosen split (lm-eval prefers test when it is set)."""
        config = task.config
        if self.split == "validation":
            if config.validation_split is None:
                raise EvomergeError(f"lm_eval: task {name!r} has no validation split")
            config.test_split = None
        elif config.test_split is None:
            raise EvomergeError(f"lm_eval: task {name!r} has no test split")

    def own_metric_names(self) -> set[str] | None:
        """``task/metric`` for each loaded task's metrics (its ``metric_list``), once set up."""
        if self._prepared is None:
            return None
        return {f"{name}/{metric}" for name, task in self._prepared.tasks.items() for metric in task.aggregation()
                if self.metric is None or metric == self.metric}

    def evaluate(self, model, tokenizer) -> dict[str, float]:
        if self._lm is None:
            self.setup(model, tokenizer)
        metrics: dict[str, float] = {}
        for task, results in self._prepared.score(self._lm).items():
            for key, value in results.items():
                # metrics are keyed "metric,filter"; skip stderr (not computed during a search)
                if "_stderr," in key or not isinstance(value, (int, float)):
                    continue
                metric = key.split(",", 1)[0]
                if self.metric is None or metric == self.metric:
                    metrics[f"{task}/{metric}"] = float(value)
        return metrics


def _unparsable(include_path: str | None) -> list[tuple[Path, str]]:
    """Task YAMLs under ``include_path`` that are not valid YAML (lm-eval skips them without a word)."""
    import yaml

    class Tolerant(yaml.SafeLoader):
        """Reads lm-eval's ``!function`` tags (and any other) as plain values."""

    Tolerant.add_multi_constructor("", lambda loader, suffix, node: None)
    out = []
    for file in sorted(Path(include_path).rglob("*.yaml")) if include_path else []:
        try:
            yaml.load(file.read_text(), Loader=Tolerant)
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            mark = getattr(exc, "problem_mark", None)
            out.append((file, (f"line {mark.line + 1}: " if mark else "") + str(getattr(exc, "problem", exc))))
    return out
