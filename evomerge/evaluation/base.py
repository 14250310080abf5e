"""The evaluator interface and its error type."""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError


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

    def setup(self, model, tokenizer) -> None:  # noqa: B027  (optional hook)
        """Per-worker preparation that does not depend on the candidate's weights."""

    @abstractmethod
    def evaluate(self, model, tokenizer) -> dict[str, float]:
        """Metrics of the model as it is now (its weights are the candidate's)."""

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
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EvaluationError(f"{source}: metric {key!r} is not a number ({value!r})")
        if not math.isfinite(value):
            raise EvaluationError(f"{source}: metric {key!r} is {value}")
        out[str(key)] = float(value)
    return out


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


def read_jsonl(path: str | Path, field: str, limit: int | None = None) -> list[str]:
    """The ``field`` of each line of a JSONL file, with errors naming file and line."""
    return [str(row[field]) for row in read_jsonl_rows(path, (field,), limit)]


def read_jsonl_rows(path: str | Path, fields: tuple[str, ...], limit: int | None = None) -> list[dict[str, Any]]:
    """The ``fields`` of each line of a JSONL file (at most ``limit`` rows), with errors naming file and line."""
    path = Path(path)
    rows: list[dict[str, Any]] = []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise EvomergeError(f"{path}: cannot read ({exc.strerror})") from None
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
