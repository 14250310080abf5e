"""Recipe: a validated model of mergekit's merge YAML, the engine's one currency.

The same object is read by `evomerge merge`, produced by a genome, stored in the
run journal, materialized in place during search and exported to disk. A
mergekit config loads unchanged; ``to_yaml`` writes one mergekit reads back.

Parameter values follow mergekit: a scalar; a *gradient* list interpolated
over the layers of an output slice (numbers, numeric strings such as ``1e-1``
included; a list of other values, such as flags, steps from one to the next);
or ``{filter, value}`` entries, one or a list, where ``filter`` is a substring
of the tensor name (``*`` matches every tensor), the first match wins and an
entry without filter is the fallback. Lookup order is source (or
``models[].parameters``) > slice > global; an empty ``parameters:`` is none.
"""

from __future__ import annotations

import math
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evomerge.yamlconfig import parse_yaml, read_text, validate

DTYPES = ("float32", "float16", "bfloat16")
NO_MATCH = object()


def _check_value(value: Any) -> Any:
    """Validate one parameter value: scalar, gradient list, or filter entries (one is made a list of one)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, (bool, int, float, str)) for v in value):
            if any(isinstance(v, float) and not math.isfinite(v) for v in value):
                raise ValueError(f"gradient values must be finite numbers, got {value!r}")
            return value
        if all(isinstance(v, dict) for v in value):
            for entry in value:
                extra = set(entry) - {"filter", "value"}
                if extra or "value" not in entry:
                    raise ValueError(f"filter entries need keys 'filter' (optional) and 'value', got {sorted(entry)}")
                if entry.get("filter") is not None and not isinstance(entry["filter"], str):
                    raise ValueError("'filter' must be a string (a substring of tensor names, or '*' for all)")
                _check_value(entry["value"])
            return value
    raise ValueError(
        "a parameter value must be a number, bool, string, a list of those (gradient) "
        f"or {{filter, value}} entries; got {value!r}"
    )


def _check_params(cls, v: Any) -> Params:
    """A ``parameters`` mapping with each value checked; empty (``parameters:`` with nothing) is none."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ValueError(f"parameters must be a mapping of parameter names to values, got {v!r}")
    return {k: _check_value(x) for k, x in v.items()}


Params = dict[str, Any]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputModel(_Strict):
    """One entry of ``models:``."""

    model: str
    parameters: Params = Field(default_factory=dict)

    _values = field_validator("parameters", mode="before")(_check_params)


class SliceSource(InputModel):
    """One source of an output slice: layers ``[start, end)`` of ``model``."""

    layer_range: tuple[int, int]

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"layer_range must be [start, end) with 0 <= start < end, got {list(v)}")
        return v


class OutputSlice(_Strict):
    """One output slice; all its sources span the same number of layers."""

    sources: list[SliceSource]
    parameters: Params = Field(default_factory=dict)

    _values = field_validator("parameters", mode="before")(_check_params)

    @model_validator(mode="after")
    def _equal_lengths(self) -> OutputSlice:
        if not self.sources:
            raise ValueError("a slice needs at least one source")
        _once([s.model for s in self.sources], "sources")
        lengths = {s.model: s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"slice sources span different numbers of layers: {lengths}")
        return self

    @property
    def length(self) -> int:
        r = self.sources[0].layer_range
        return r[1] - r[0]


class Recipe(_Strict):
    """A mergekit merge configuration."""

    merge_method: str
    base_model: str | None = None
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    parameters: Params = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    #: evomerge extension: seed for DARE/DELLA (mergekit takes --random-seed on the command line).
    random_seed: int | None = None

    _values = field_validator("parameters", mode="before")(_check_params)

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is not None:
            v = v.removeprefix("torch.")  # mergekit reads torch.bfloat16 as bfloat16
        if v is not None and v not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {v!r}")
        return v

    @model_validator(mode="after")
    def _one_layout(self) -> Recipe:
        if (self.models is None) == (self.slices is None):
            raise ValueError("give exactly one of 'models' or 'slices'")
        if self.models is not None and not self.models:
            raise ValueError("'models' is empty")
        if self.models:
            _once([m.model for m in self.models], "models")
        if self.slices is not None and not self.slices:
            raise ValueError("'slices' is empty")
        return self

    # -- YAML ----------------------------------------------------------------
    @classmethod
    def from_yaml(cls, text: str, source: str = "<recipe>") -> Recipe:
        """Parse and validate mergekit YAML; errors name the line and key at fault."""
        return validate(cls, parse_yaml(text, source, "merge_method"), text, source)

    @classmethod
    def from_file(cls, path) -> Recipe:
        """Read a recipe YAML file."""
        return cls.from_yaml(read_text(path), str(path))

    def to_dict(self) -> dict:
        """Plain data in mergekit's layout (unset optional keys omitted)."""
        return self.model_dump(exclude_none=True, exclude_defaults=False, mode="json")

    def to_yaml(self) -> str:
        """mergekit YAML for this recipe."""
        data = self.to_dict()
        for key in ("parameters",):
            if not data.get(key):
                data.pop(key, None)
        for group in data.get("models", []) + [s for sl in data.get("slices", []) for s in sl["sources"]]:
            if not group.get("parameters"):
                group.pop("parameters", None)
        for sl in data.get("slices", []):
            if not sl.get("parameters"):
                sl.pop("parameters", None)
        return yaml.safe_dump(data, sort_keys=False)

    def with_models(self, paths: dict[str, str]) -> Recipe:
        """A copy with the model references in ``paths`` replaced (e.g. relative paths by absolute ones)."""
        data = self.to_dict()
        for key in ("base_model", "tokenizer_source"):
            if data.get(key) in paths:
                data[key] = paths[data[key]]
        for group in data.get("models", []) + [s for sl in data.get("slices", []) for s in sl["sources"]]:
            group["model"] = paths.get(group["model"], group["model"])
        return type(self).model_validate(data)

    # -- structure -----------------------------------------------------------
    def referenced_models(self) -> list[str]:
        """Every model path the recipe names, base first, without duplicates."""
        seen: list[str] = []
        for name in [self.base_model] + [m.model for m in self.models or []] + [
            s.model for sl in self.slices or [] for s in sl.sources
        ]:
            if name is not None and name not in seen:
                seen.append(name)
        return seen


def _once(models: list[str], key: str) -> None:
    """Refuse a model listed twice: mergekit keys its inputs by model, so it would merge it once."""
    first: dict[str, int] = {}
    for i, model in enumerate(models):
        if model in first:
            raise ValueError(f"{key}[{i}]: {model} is already {key}[{first[model]}]; each model takes one entry "
                             "(mergekit merges a repeated model once): merge their parameters into one")
        first[model] = i


# -- parameter lookup ---------------------------------------------------------
def interpolate(values: list[float], t: float) -> float:
    """mergekit's gradient: anchors evenly spaced over t in [0, 1], linear in between."""
    if len(values) == 1:
        return float(values[0])
    s = t * (len(values) - 1)
    i = min(int(math.floor(s)), len(values) - 1)
    frac = s - i
    j = min(i + 1, len(values) - 1)
    return float((1 - frac) * values[i] + frac * values[j])


def evaluate(value: Any, tensor_name: str, t: float) -> Any:
    """Concrete value of one parameter setting for ``tensor_name`` at position ``t``.

    Returns ``NO_MATCH`` when ``value`` is a filter list none of whose entries
    applies, so the lookup falls through to the next level.
    """
    if isinstance(value, list):
        if value and isinstance(value[0], dict):
            for entry in value:
                flt = entry.get("filter")
                if flt is None or flt == "*" or flt in tensor_name:
                    return evaluate(entry["value"], tensor_name, t)
            return NO_MATCH
        numbers = [_number(v) for v in value]
        if None not in numbers:
            return interpolate(numbers, t)
        return value[int(t * (len(value) - 1))]  # flags and labels step, as mergekit selects them
    return value


def _number(value: Any) -> float | None:
    """A gradient anchor as a number (YAML reads ``1e-1`` as a string), or None for a flag or a label."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except ValueError:
        return None


def lookup(name: str, tensor_name: str, t: float, *levels: Params) -> Any:
    """First concrete value of parameter ``name`` across ``levels`` (highest precedence first)."""
    for level in levels:
        if name in level:
            value = evaluate(level[name], tensor_name, t)
            if value is not NO_MATCH:
                return value
    return NO_MATCH
