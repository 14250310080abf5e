"""The YAML that ``evomerge adamerge`` reads: base model, tasks with unlabeled data, settings.

::

    base_model: zoo:lm/small/base
    tasks:
      - model: zoo:lm/small/shift                      # the task's fine-tuned model
        unlabeled: zoo:lm/small/tasks/unlabeled.jsonl  # .jsonl prompts or .npz inputs
        where: {task: shift}                           # rows of a shared JSONL file that belong to it
      - ...
    granularity: layer      # task | layer | tensor
    plus_plus: false        # AdaMerging++: TIES-trimmed task vectors (density 0.2)
    steps: 500

Unlabeled data is either JSONL (``field``, default ``prompt``: text tokenized
with the base model's tokenizer) or ``.npz`` (array ``input_key``, default
``pixel_values``, first axis = samples). ``head`` lists tensor-name prefixes of
the task's own model used as its classification head (the multi-head setting:
merged encoder, one head per task).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from evomerge.adamerging.train import AdaMergingSettings, EntropyTask
from evomerge.errors import EvomergeError
from evomerge.yamlconfig import parse_yaml, read_text, validate, with_overrides


class TaskConfig(BaseModel):
    """One task: its fine-tuned model, unlabeled inputs and (optionally) head tensors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    unlabeled: str
    name: str | None = None
    field: str = "prompt"
    where: dict[str, Any] = Field(default_factory=dict)
    input_key: str = "pixel_values"
    head: list[str] = Field(default_factory=list)
    limit: int | None = Field(None, ge=1)

    @property
    def label(self) -> str:
        return self.name or Path(self.model.rstrip("/")).name


class AdaMergingConfig(AdaMergingSettings):
    """A base model, at least one task, and the training settings (flat)."""

    base_model: str
    tasks: list[TaskConfig] = Field(min_length=1)

    @classmethod
    def from_file(cls, path: str | Path) -> AdaMergingConfig:
        """Read and validate an AdaMerging YAML file."""
        text = read_text(path)
        return validate(cls, parse_yaml(text, str(path), "tasks"), text, str(path))

    @property
    def settings(self) -> AdaMergingSettings:
        return AdaMergingSettings(**{k: getattr(self, k) for k in AdaMergingSettings.model_fields})

    def with_settings(self, **overrides: Any) -> AdaMergingConfig:
        """A copy with CLI overrides (``None`` values ignored), validated again."""
        return with_overrides(self, overrides)

    def resolved(self, *, relative_to: Path | None = None, progress=None) -> AdaMergingConfig:
        """The config with model and data references made absolute (building zoo models on first use)."""
        from evomerge.spaces.models import resolve_ref

        def ref(r: str, key: str) -> str:
            return resolve_ref(r, relative_to=relative_to, progress=progress, key=key)

        data = self.model_dump(mode="json")
        data["base_model"] = ref(self.base_model, "base_model")
        for i, task in enumerate(data["tasks"]):
            task["model"] = ref(task["model"], f"tasks[{i}].model")
            task["unlabeled"] = ref(task["unlabeled"], f"tasks[{i}].unlabeled")
        return type(self).model_validate(data)

    def build_tasks(self) -> list[EntropyTask]:
        """Load every task's unlabeled inputs (tokenized once for text) and head tensors."""
        names = [t.label for t in self.tasks]
        if len(set(names)) != len(names):
            raise EvomergeError(f"adamerging: task names repeat ({', '.join(names)}); give each task a distinct name")
        first: dict[str, int] = {}
        for i, task in enumerate(self.tasks):
            if task.model in first:
                # its task vector would be counted twice, and the exported recipe lists it twice (which mergekit
                # rebuilds counting it once)
                raise EvomergeError(f"adamerging: tasks[{i}] and tasks[{first[task.model]}] both merge {task.model}; "
                                    "give each model one task (put all its unlabeled inputs in that task)")
            first[task.model] = i
        tokenizer = None
        out = []
        for i, task in enumerate(self.tasks):
            if task.unlabeled.endswith(".npz"):
                inputs = _npz_inputs(task)
            else:
                if tokenizer is None:
                    from evomerge.io.live import load_tokenizer

                    tokenizer = load_tokenizer(self.base_model)
                    if tokenizer is None:
                        raise EvomergeError(f"adamerging: tasks[{i}].unlabeled {task.unlabeled} holds text prompts, "
                                            f"but the base model {self.base_model} has no tokenizer to read them "
                                            "(an image model takes .npz inputs)")
                inputs = _text_inputs(task, tokenizer)
            out.append(EntropyTask(task.label, task.model, inputs, _head(task)))
        return out


def _npz_inputs(task: TaskConfig) -> dict[str, torch.Tensor]:
    import numpy as np

    from evomerge.evaluation.base import read_npz

    array = read_npz(task.unlabeled, (task.input_key,), task.limit)[task.input_key]
    if array.dtype.kind not in "biuf":
        raise EvomergeError(f"{task.unlabeled}: {task.input_key} holds {array.dtype} values, not numbers")
    return {task.input_key: torch.from_numpy(np.ascontiguousarray(array)).float()}


def _text_inputs(task: TaskConfig, tokenizer) -> dict[str, torch.Tensor]:
    from evomerge.evaluation.base import read_jsonl_rows, tokenize_batches

    keys = (task.field, *task.where)
    rows = [r for r in read_jsonl_rows(task.unlabeled, keys) if all(r[k] == v for k, v in task.where.items())]
    prompts = [r[task.field] for r in rows][: task.limit]
    blank = next((i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()), None)
    if blank is not None:
        raise EvomergeError(f"{task.unlabeled}: the {task.field!r} of row {blank + 1} of task {task.label!r} "
                            f"is {prompts[blank]!r}, not a non-empty text")
    if not prompts:
        raise EvomergeError(f"{task.unlabeled}: no unlabeled rows for task {task.label!r} (where {task.where})")
    (batch,) = tokenize_batches(tokenizer, prompts, len(prompts), "left")
    return dict(batch)


def _head(task: TaskConfig) -> dict[str, torch.Tensor]:
    from evomerge.io.model_dir import ModelDir

    if not task.head:
        return {}
    model = ModelDir(task.model)
    names = [n for n in model.names if any(n.startswith(p) for p in task.head)]
    if not names:
        raise EvomergeError(f"{task.model}: no tensor starts with head prefix {', '.join(task.head)}")
    return {n: model.tensor(n).float() for n in names}
