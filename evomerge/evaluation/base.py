"""The evaluator interface and its error type."""

from __future__ import annotations

import json
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.yamlconfig import read_text


class EvaluationError(EvomergeError):
    """A candidate could not be scored; the search records it as a failed candidate.

    The evaluator stays usable for the next candidate.
    """


class Evaluator(ABC):
    """Scores a live model. Subclasses take their settings as keyword arguments."""

    #: Registry name, e.g. ``"lm_eval"``.
    name: str = ""
    #: Set from a config's ``name:``; metrics are then reported as ``prefix/metric``, so two
    #: evaluators of one type (say, accuracy on two tasks) do not clash.
    prefix: str | None = None
    #: The metric names ``evaluate`` returns, where they are fixed (unprefixed).
    fixed_metrics: tuple[str, ...] | None = None

    def setup(self, model, tokenizer) -> None:  # noqa: B027  (optional hook)
        """Per-worker preparation that does not depend on the candidate's weights."""

    @abstractmethod
    def evaluate(self, model, tokenizer) -> dict[str, float]:
        """Metrics of the model as it is now (its weights are the candidate's)."""

    def metric_names(self) -> set[str] | None:
        """The names ``evaluate`` reports, prefixed, where known after ``setup`` (``None``: only results tell)."""
        names = self.own_metric_names()
        if names is None:
            return None
        return {f"{self.prefix}/{n}" for n in names} if self.prefix else set(names)

    def own_metric_names(self) -> set[str] | None:
        """The unprefixed names ``evaluate`` reports, where known after ``setup``."""
        return None if self.fixed_metrics is None else set(self.fixed_metrics)

    def __call__(self, model, tokenizer) -> dict[str, float]:
        """``evaluate`` with the result checked: named, finite numbers only."""
        try:
            metrics = self.evaluate(model, tokenizer)
        except EvomergeError:
            raise
        except Exception as exc:  # a plugin failure is the candidate's failure, not the worker's
            raise EvaluationError(f"{self.name}: {type(exc).__name__}: {exc}") from exc
        metrics = check_metrics(self.name, metrics)
        return {f"{self.prefix}/{k}": v for k, v in metrics.items()} if self.prefix else metrics


def check_metrics(source: str, metrics: Any) -> dict[str, float]:
    """Validate an evaluator's result: a dict of metric name -> finite number."""
    if not isinstance(metrics, dict) or not metrics:
        raise EvaluationError(f"{source}: expected a non-empty dict of metrics, got {type(metrics).__name__}")
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
            value = value.item()  # a NumPy scalar or a 0-d tensor
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise EvaluationError(f"{source}: metric {key!r} is not a number ({value!r})")
        if not math.isfinite(value):
            raise EvaluationError(f"{source}: metric {key!r} is {value}")
        out[str(key)] = float(value)
    return out


def check_counts(source: str, **settings: tuple[Any, int]) -> None:
    """Refuse a setting that must be a whole number of at least a bound: ``key=(value, least)``; None passes."""
    for key, (value, least) in settings.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise EvomergeError(f"{source}: {key} must be a whole number >= {least}, not {value!r}")


def check_image_model(source: str, model, path) -> None:
    """Refuse images (an ``.npz`` file) for a model whose forward takes no ``pixel_values``."""
    import inspect

    if "pixel_values" not in inspect.signature(model.forward).parameters:
        raise EvomergeError(f"{source}: {path} holds images, but {type(model).__name__} takes text, not pixel_values")


def tokenize_batches(tokenizer, texts: list[str], batch_size: int, padding_side: str, **kwargs) -> list:
    """Tokenize ``texts`` once into padded batches, padding on ``padding_side``.

    The tokenizer's own padding side is restored afterwards (it is shared with
    other evaluators such as lm-eval's wrapper).
    """
    saved = tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        return [
            tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False, **kwargs)
            for i in range(0, len(texts), batch_size)
        ]
    finally:
        tokenizer.padding_side = saved


def per_batch(model, batches: list, reduce: Callable) -> list:
    """``reduce(logits)`` of ``model`` on each prepared batch (moved to the model's device), without gradients.

    Reduced per batch, so a language model's full logits are never held for
    more than one batch.
    """
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return [reduce(model(**{k: v.to(device) for k, v in batch.items()}).logits) for batch in batches]


def read_jsonl(path: str | Path, field: str, limit: int | None = None) -> list[str]:
    """The ``field`` of each line of a JSONL file, with errors naming file and line."""
    return [str(row[field]) for row in read_jsonl_rows(path, (field,), limit)]


def read_jsonl_rows(path: str | Path, fields: tuple[str, ...], limit: int | None = None) -> list[dict[str, Any]]:
    """The ``fields`` of each line of a JSONL file (at most ``limit`` rows), with errors naming file and line."""
    path = Path(path)
    rows: list[dict[str, Any]] = []
    lines = read_text(path).splitlines()
    want = " and ".join(repr(f) for f in fields)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            rows.append({f: data[f] for f in fields})
        except (json.JSONDecodeError, KeyError, TypeError):
            raise EvomergeError(f"{path}: line {number}: expected a JSON object with {want} fields") from None
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise EvomergeError(f"{path}: no rows with {want}")
    return rows


def read_npz(path: str | Path, keys: tuple[str, ...], limit: int | None = None) -> dict[str, Any]:
    """Arrays ``keys`` of an ``.npz`` file (first ``limit`` rows), with errors naming file and key.

    Float arrays must be finite: a NaN input makes every score or loss NaN.
    """
    import numpy as np

    try:
        with np.load(path) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise EvomergeError(f"{path}: no array {missing[0]!r} (it has {', '.join(data.files) or 'none'})")
            arrays = {k: data[k][:limit] for k in keys}
    except (OSError, ValueError) as exc:
        raise EvomergeError(f"{path}: cannot read as .npz ({exc})") from None
    lengths = {len(a) for a in arrays.values()}
    if len(lengths) != 1 or 0 in lengths:
        raise EvomergeError(f"{path}: arrays {', '.join(keys)} must hold the same, non-zero number of rows")
    for key, array in arrays.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            row = int(np.flatnonzero(~np.isfinite(array.reshape(len(array), -1)).all(axis=1))[0])
            raise EvomergeError(f"{path}: array {key!r} holds NaN or Inf values (row {row} first)")
    return arrays


class HeadSwap:
    """Tensors of another model (a task's own classification head) put into the live model before scoring.

    In the multi-head setting (one merged encoder, a head per task) the merger
    writes a meaningless merged head; each task's evaluator puts its own back
    before every evaluation.
    """

    def __init__(self, model_dir: str, prefix: str) -> None:
        self.model_dir = model_dir
        self.prefix = prefix
        self.tensors: dict[str, Any] = {}

    def setup(self, model) -> None:
        """Load the head tensors and check them against the live model."""
        from evomerge.io.live import checkpoint_parameters
        from evomerge.io.model_dir import ModelDir

        source = ModelDir(self.model_dir)
        own = checkpoint_parameters(model)
        names = [n for n in source.names if n.startswith(self.prefix)]
        if not names:
            raise EvomergeError(f"{self.model_dir}: no tensor starts with head prefix {self.prefix!r}")
        for name in names:
            tensor = source.tensor(name)
            if name not in own:
                raise EvomergeError(f"{self.model_dir}: head tensor {name!r} is not in the evaluated model")
            if tuple(tensor.shape) != tuple(own[name].shape):
                raise EvomergeError(f"{self.model_dir}: head tensor {name!r} has shape {list(tensor.shape)}, "
                                    f"the evaluated model has {list(own[name].shape)}")
            self.tensors[name] = tensor.to(own[name].dtype)
        # the live model's head parameters, resolved once: apply runs for every candidate
        self._pairs = [(own[name], tensor) for name, tensor in self.tensors.items()]

    def apply(self, model) -> None:
        """Write the head into the live model set up with (in place)."""
        import torch

        with torch.no_grad():
            for param, tensor in self._pairs:
                param.copy_(tensor)


def image_batches(pixel_values, batch_size: int) -> list[dict[str, Any]]:
    """``pixel_values`` (numpy, N x C x H x W) as float tensors in batches of ``batch_size``."""
    import torch

    values = torch.from_numpy(pixel_values).float()
    return [{"pixel_values": values[i : i + batch_size]} for i in range(0, len(values), batch_size)]
