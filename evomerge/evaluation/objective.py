"""The objective of a search: which evaluators run and how their metrics become fitness.

Declared in a search space's ``objective`` section::

    objective:
      evaluators:
        - type: lm_eval
          include_path: zoo:lm/small/tasks
          tasks: [zoo_shift, zoo_rev, zoo_sort]
          limit: 64
      fitness:
        - name: exact_match
          direction: maximize
          metrics: [zoo_shift/exact_match, zoo_rev/exact_match, zoo_sort/exact_match]

Each fitness entry is one objective (several → multi-objective search, e.g. with
NSGA-II). ``metrics`` is a list (plain mean) or a ``{metric: weight}`` map
(weighted mean, or ``aggregate: sum`` for a weighted sum). Besides the
evaluators' metrics, the worker reports ``merge/num_layers`` (the candidate's
decoder depth), so "score vs. merged layer count" needs no evaluator.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evomerge.errors import EvomergeError


#: Evaluator setting naming the file a report scores instead of ``path`` (see ``Objective.for_split``).
TEST_PATH = "test_path"


def builtin_metrics(model) -> dict[str, float]:
    """Metrics every candidate has, whatever the evaluators: its decoder depth."""
    return {"merge/num_layers": float(model.config.num_hidden_layers)}


def check_reports(evaluators, fitness: list, builtin: set[str], where: str) -> None:
    """Refuse, before any candidate, what would fail every one.

    Two evaluators reporting one metric name, and (when every evaluator's names
    are known once set up: all but ``python`` ones) a fitness metric that none
    reports. ``where``: the config section (``objective``, ``surrogate``).
    """
    owner: dict[str, str] = {name: "the built-in metrics" for name in builtin}
    complete = True
    for i, evaluator in enumerate(evaluators):
        names = evaluator.metric_names()
        if names is None:
            complete = False
            continue
        for name in sorted(names):
            if name in owner:
                raise EvomergeError(f"{where}.evaluators[{i}] reports metric {name!r}, as {owner[name]} does; "
                                    "give it a name: (its metrics are then NAME/metric)")
            owner[name] = f"{where}.evaluators[{i}]"
    if complete:
        for f in fitness:
            missing = sorted(set(f.metrics) - set(owner))
            if missing:
                raise EvomergeError(f"{where}: fitness {f.name!r} needs metric {missing[0]!r}, which no evaluator "
                                    f"reports; they report: {', '.join(sorted(owner))}")


class Fitness(BaseModel):
    """One objective: an aggregate of metrics and the direction that is better."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    direction: Literal["maximize", "minimize"]
    metrics: dict[str, float]
    aggregate: Literal["mean", "sum"] = "mean"

    @field_validator("metrics", mode="before")
    @classmethod
    def _weights(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list):
            v = {m: 1.0 for m in v}
        if isinstance(v, dict) and not v:
            raise ValueError("list at least one metric")
        return v

    @model_validator(mode="after")
    def _finite_weights(self) -> Fitness:
        for metric, weight in self.metrics.items():
            if not math.isfinite(weight):
                raise ValueError(f"fitness {self.name!r}: metric {metric!r} has weight {weight}; give a finite number")
        if self.aggregate == "mean" and not sum(self.metrics.values()) > 0:
            raise ValueError(f"fitness {self.name!r}: the weights of a mean must sum to more than 0 "
                             f"(they sum to {sum(self.metrics.values())}); use aggregate: sum for signed weights")
        return self

    def value(self, metrics: dict[str, float]) -> float:
        """This objective's value for a candidate's metrics (all named metrics must be present)."""
        total = sum(w * metrics[m] for m, w in self.metrics.items())
        return total / sum(self.metrics.values()) if self.aggregate == "mean" else total


class Objective(BaseModel):
    """Evaluator configs (validated by the evaluator registry when built) and fitness entries."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    evaluators: list[dict[str, Any]] = Field(min_length=1)
    fitness: list[Fitness] = Field(min_length=1)

    @field_validator("fitness")
    @classmethod
    def _distinct(cls, v: list[Fitness]) -> list[Fitness]:
        names = [f.name for f in v]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"fitness name {name!r} is used twice; name each objective once")
        return v

    @field_validator("evaluators")
    @classmethod
    def _typed(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, spec in enumerate(v):
            if "type" not in spec:
                raise ValueError(f"evaluator {i} needs a 'type' (e.g. lm_eval, entropy, perplexity, python)")
        return v

    @property
    def directions(self) -> list[str]:
        return [f.direction for f in self.fitness]

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fitness]

    def values(self, metrics: dict[str, float]) -> list[float]:
        """Fitness values, one per objective; a metric missing from ``metrics`` is a KeyError naming it."""
        missing = sorted({m for f in self.fitness for m in f.metrics} - set(metrics))
        if missing:
            raise KeyError(
                f"fitness needs metric {missing[0]!r}, the evaluators gave: {', '.join(sorted(metrics))}"
            )
        return [f.value(metrics) for f in self.fitness]

    def for_split(self, split: str) -> list[dict[str, Any]]:
        """The evaluator configs switched to ``split``.

        lm_eval evaluators change their ``split``; file-based ones (accuracy,
        perplexity, ...) read their ``test_path`` instead of ``path`` for
        ``test``. An evaluator with no test split (a file without
        ``test_path``, a python function) is left out of ``test`` (see
        ``untested``): scored again it would report validation numbers as test
        ones. Reports use ``test``, and score all of it: ``limit`` is a
        per-candidate cost knob of the search, not a property of the reported
        number.
        """
        out = []
        for spec in self.evaluators:
            spec = dict(spec)
            test_path = spec.pop(TEST_PATH, None)
            if spec["type"] == "lm_eval":
                spec["split"] = split
            elif split == "test":
                if test_path is None:
                    continue
                spec["path"] = test_path
            if split == "test":
                spec.pop("limit", None)
            out.append(spec)
        return out

    def untested(self) -> list[str]:
        """The evaluators (``name`` or type) that ``for_split("test")`` leaves out: they have no test split."""
        return [evaluator_label(spec) for spec in self.evaluators if spec["type"] != "lm_eval" and TEST_PATH not in spec]


def evaluator_label(spec: dict[str, Any]) -> str:
    """How messages name an evaluator config: its ``name``, else its type."""
    return str(spec.get("name") or spec["type"])


class Surrogate(Fitness):
    """Screening: a cheap score ranks each asked batch; only the best ``keep`` fraction is fully evaluated.

    Declared in a search space's ``surrogate`` section::

        surrogate:
          evaluators:
            - {type: entropy, path: zoo:lm/small/tasks/unlabeled.jsonl}
          metrics: [entropy]
          direction: minimize
          keep: 0.5          # fraction of each batch that gets the full evaluation
          batch: 8           # candidates screened together (default: 4 per worker)

    The rest of a batch is journaled as screened and told an estimate; see
    ``evomerge.run.screening``.
    """

    name: str = "surrogate"
    direction: Literal["maximize", "minimize"] = "minimize"
    evaluators: list[dict[str, Any]] = Field(min_length=1)
    keep: float = Field(0.5, gt=0, le=1)
    batch: int | None = Field(None, ge=2, strict=True)

    _typed = field_validator("evaluators")(Objective._typed.__func__)
