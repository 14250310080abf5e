"""Plan a merge: resolve a Recipe against the models' headers into per-tensor jobs.

Planning reads only config.json files and safetensors headers, and performs
every check (missing tensors, shape mismatches, layer ranges, parameters and
their ranges) before any weight is read or any file is written.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic

from evomerge.errors import EvomergeError, prefixed
from evomerge.io.model_dir import ModelDir
from evomerge.methods.sparsify import RESCALE_METHODS
from evomerge.methods.registry import REQUIRED, MergeMethod, check_params, get_method
from evomerge.recipe import NO_MATCH, OutputSlice, Recipe, SliceSource, lookup
from evomerge.zoo.registry import ZOO_PREFIX, resolve_zoo_ref


@dataclass(frozen=True)
class TensorJob:
    """How to produce one output tensor."""

    out_name: str
    base: tuple[str, str] | None  # (model, tensor name)
    sources: tuple[tuple[str, str], ...]
    shape: tuple[int, ...]
    dtype: str  # output dtype
    kwargs: dict[str, Any]  # the kernel's arguments, resolved and validated once at planning


@dataclass
class MergePlan:
    """Everything export needs: the jobs, the open models, the output config."""

    recipe: Recipe
    method: MergeMethod
    models: dict[str, ModelDir]
    jobs: list[TensorJob]
    config: dict
    reference: str  # model whose config/tokenizer the output starts from
    num_layers: int


def open_models(recipe: Recipe, *, allow_pickle: bool = False, base_dir: Path | None = None) -> dict[str, ModelDir]:
    """Open every model the recipe names (relative paths resolve against ``base_dir``; ``zoo:`` references
    name members of the embedded zoo, as in search spaces)."""
    return {name: ModelDir(model_path(name, base_dir), allow_pickle=allow_pickle)
            for name in recipe.referenced_models()}


def model_path(name: str, base_dir: Path | None = None) -> Path:
    """Where a recipe's model reference points: a ``zoo:`` member (built on first use), a path as given,
    or, when that does not exist, relative to ``base_dir`` (the recipe's directory)."""
    path = Path(name).expanduser()
    if name.startswith(ZOO_PREFIX):
        return resolve_zoo_ref(name)
    if not path.is_absolute() and base_dir is not None and not path.exists():
        return base_dir / path
    return path


def _slices(recipe: Recipe, models: dict[str, ModelDir], method: MergeMethod) -> list[OutputSlice]:
    """The recipe as slices: ``models:`` becomes one slice over every model's layers."""
    if recipe.slices is not None:
        return recipe.slices
    sources = [
        SliceSource(model=m.model, parameters=m.parameters, layer_range=(0, models[m.model].num_layers))
        for m in recipe.models
    ]
    if recipe.base_model and method.base != "none" and recipe.base_model not in [s.model for s in sources]:
        base = models[recipe.base_model]
        sources.append(SliceSource(model=recipe.base_model, layer_range=(0, base.num_layers)))
    counts = {s.model: s.layer_range[1] for s in sources}
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{m} has {n}" for m, n in counts.items())
        raise EvomergeError(f"models have different layer counts ({listing}); merge them layer by layer with slices")
    return [OutputSlice(sources=sources)]


def plan_merge(recipe: Recipe, models: dict[str, ModelDir], *, where: str = "recipe") -> MergePlan:
    """Resolve ``recipe`` into tensor jobs, validating everything up front."""
    with prefixed(where):
        method = get_method(recipe.merge_method)
    used = set(recipe.parameters)
    for sl in recipe.slices or []:
        used |= set(sl.parameters)
        for s in sl.sources:
            used |= set(s.parameters)
    for m in recipe.models or []:
        used |= set(m.parameters)
    check_params(method, sorted(used), where)
    if method.base == "required" and not recipe.base_model:
        raise EvomergeError(f"{where}: {method.name} needs a base_model")

    types = {m: models[m].config.get("model_type") for m in recipe.referenced_models()}
    if len(set(types.values())) > 1:
        # the output runs on one family's code: another family's layers would load wrongly or not at all
        listing = ", ".join(f"{m} is {t!r}" for m, t in types.items())
        raise EvomergeError(f"{where}: models of different architectures ({listing}); merge models of one family")
    slices = _slices(recipe, models, method)
    reference = recipe.base_model or slices[0].sources[0].model
    ref = models[reference]
    arch = ref.arch
    jobs: list[TensorJob] = []
    # every tensor any model of the first (last) slice has outside the layers: one a model lacks is
    # reported by _job, not left out of the merge
    global_names = _union(layout(models[m]).outside for m in dict.fromkeys(
        s.model for s in (*slices[0].sources, *slices[-1].sources)))
    pre = [n for n in global_names if arch.is_pre(n)]
    post = [n for n in global_names if not arch.is_pre(n)]

    def add(out_name: str, sl: OutputSlice, names: list[str], t: float, label: str) -> None:
        jobs.append(_job(recipe, method, models, out_name, sl, names, t, label, where))

    def label(si: int) -> str:  # the key the user wrote: ``models:`` is planned as one slice
        return f"slices[{si}]" if recipe.slices is not None else "models"

    for name in pre:
        add(name, slices[0], [name] * len(slices[0].sources), 0.0, label(0))
    offset = 0
    stack = []  # per output layer: (its source model, its index there), for the per-layer config lists
    for si, sl in enumerate(slices):
        for s in sl.sources:
            n_layers = models[s.model].num_layers
            if s.layer_range[1] > n_layers:
                raise EvomergeError(
                    f"{where}: {label(si)}: layer_range {list(s.layer_range)} of {s.model} exceeds its {n_layers} layers"
                )
        # a layer's tensors are those any source has there (the base's first), so a source lacking one
        # is reported instead of the tensor being dropped
        lead = next((s for s in sl.sources if s.model == recipe.base_model), sl.sources[0])
        order = [lead, *(s for s in sl.sources if s is not lead)]
        stack += [(models[lead.model], lead.layer_range[0] + j) for j in range(sl.length)]
        for j in range(sl.length):
            t = j / (sl.length - 1) if sl.length > 1 else 1.0
            for s in order:
                if s.layer_range[0] + j not in layout(models[s.model]).layers:
                    raise EvomergeError(f"{where}: {label(si)}: layer {s.layer_range[0] + j} of {s.model} has no "
                                        f"tensors, though its config.json gives it {models[s.model].num_layers} layers")
            for suffix in _union(layout(models[s.model]).layers[s.layer_range[0] + j] for s in order):
                names = [models[s.model].arch.layer_name(s.layer_range[0] + j, suffix) for s in sl.sources]
                add(arch.layer_name(offset + j, suffix), sl, names, t, label(si))
        offset += sl.length
    for name in post:
        add(name, slices[-1], [name] * len(slices[-1].sources), 0.0, label(len(slices) - 1))
    _check_output_shapes(jobs, reference, ref, where)

    config = dict(ref.config)
    if recipe.slices is not None:
        # layer_config reads the config through transformers (a second of imports): only stacks need it
        config = arch.with_layers(ref.layer_config, [(m.layer_config, i) for m, i in stack])
    if config.get("tie_word_embeddings") and any(arch.tied_to(job.out_name) for job in jobs):
        # a head of its own was merged (a source stores one): tied, loaders would replace it by the embeddings
        config["tie_word_embeddings"] = False
    out_dtype = recipe.out_dtype or recipe.dtype
    if out_dtype:
        config["torch_dtype" if "torch_dtype" in config else "dtype"] = out_dtype
    return MergePlan(recipe, method, models, jobs, config, reference, offset)


def _job(recipe: Recipe, method: MergeMethod, models: dict[str, ModelDir], out_name: str, sl: OutputSlice,
         names: list[str], t: float, label: str, where: str) -> TensorJob:
    base_ref = None
    sources: list[tuple[str, str]] = []
    params: list[dict[str, Any]] = []
    shapes: dict[str, tuple[int, ...]] = {}
    for s, name in zip(sl.sources, names):
        model = models[s.model]
        info = model.infos.get(name)
        tied = model.arch.tied_to(name)
        if info is None and tied in model.infos:  # a model tying its head to its embeddings stores only those
            name, info = tied, model.infos[tied]
        if info is None:
            raise EvomergeError(f"{where}: {label}: tensor {name!r} is missing from {s.model}")
        shapes[f"{s.model}:{name}"] = info.shape
        if method.base != "none" and s.model == recipe.base_model:
            base_ref = (s.model, name)
            continue
        resolved = {}
        for key, default in method.source_params.items():
            value = lookup(key, name, t, s.parameters, sl.parameters, recipe.parameters)
            if value is NO_MATCH:
                if default is REQUIRED:
                    raise EvomergeError(f"{where}: {label}: parameter {key!r} is required for model {s.model}")
                value = default
            resolved[key] = _typed(key, value, default, f"{where}: {label}: model {s.model} at {name}")
        if "density" in resolved and not 0 <= float(resolved["density"]) <= 1:
            raise EvomergeError(f"{where}: {label}: density {resolved['density']} for {s.model} at {name} is outside [0, 1]")
        density, epsilon, gamma = (resolved.get(k) for k in ("density", "epsilon", "gamma"))
        if epsilon is not None and density < 1 and not (0 < density - epsilon and density + epsilon < 1):
            raise EvomergeError(f"{where}: {label}: della needs 0 < density - epsilon and density + epsilon < 1; "
                                f"{s.model} at {name} has density {density}, epsilon {epsilon}")
        if gamma is not None and not 0 <= gamma < 1:
            raise EvomergeError(f"{where}: {label}: gamma {gamma} for {s.model} at {name} is outside [0, 1)")
        sources.append((s.model, name))
        params.append(resolved)
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{k} {list(v)}" for k, v in shapes.items())
        raise EvomergeError(f"{where}: shape mismatch for {out_name}: {listing}")
    if method.base == "required" and base_ref is None:
        raise EvomergeError(f"{where}: {label}: base_model {recipe.base_model} is not among its sources")
    if len(sources) < method.min_sources or (method.max_sources is not None and len(sources) > method.max_sources):
        want = f"{method.min_sources}" + (f"..{method.max_sources}" if method.max_sources != method.min_sources else "")
        raise EvomergeError(f"{where}: {label}: {method.name} takes {want} model(s) besides the base, got {len(sources)}")
    global_params = {}
    for key, default in method.global_params.items():
        value = lookup(key, out_name, t, sl.parameters, recipe.parameters)
        if value is NO_MATCH:
            if default is REQUIRED:
                raise EvomergeError(f"{where}: parameter {key!r} is required by {method.name}")
            value = default
        global_params[key] = _typed(key, value, default, f"{where}: {out_name}")
    if global_params.get("rescale_method", "l1") not in RESCALE_METHODS:
        raise EvomergeError(
            f"{where}: rescale_method {global_params['rescale_method']!r}; choose one of {', '.join(RESCALE_METHODS)}"
        )
    ref_dtype = models[(base_ref or sources[0])[0]].info((base_ref or sources[0])[1]).dtype
    return TensorJob(
        out_name=out_name,
        base=base_ref,
        sources=tuple(sources),
        shape=next(iter(shapes.values())),
        dtype=recipe.out_dtype or recipe.dtype or ref_dtype,
        kwargs=method.kwargs(params, global_params),
    )


def _check_output_shapes(jobs: list[TensorJob], reference: str, ref, where: str) -> None:
    """Every output tensor has the shape the reference model gives it, whose config the output takes.

    A frankenmerge stacking layers of models of other widths (or taking the
    LM head from a model with another vocabulary) would otherwise write a
    model its own ``config.json`` cannot load.
    """
    first_layer = layout(ref).first_shapes
    for job in jobs:
        info = ref.infos.get(job.out_name)
        parts = ref.arch.split(job.out_name)
        want = tuple(info.shape) if info is not None else first_layer.get(parts[1]) if parts else None
        if want is not None and tuple(job.shape) != want:
            model, name = job.base or job.sources[0]
            raise EvomergeError(
                f"{where}: output tensor {job.out_name} would come from {name} of {model}, shape {list(job.shape)}, "
                f"but the output takes its config from {reference}, which has {list(want)} there; "
                "models stacked or merged into one output must share their tensor shapes"
            )


def _typed(key: str, value: Any, default: Any, where: str) -> Any:
    """A parameter value checked against its kind (its default's): numeric ones are finite numbers,
    flags are booleans.

    YAML reads ``3e-1`` (no dot) as a string; such strings are read as the
    number they spell, and ``"false"``/``"no"``/``0`` as the flag they spell, as
    mergekit's pydantic models do. Anything else is refused: ``normalize:
    "false"`` taken as a true value would silently merge the opposite way.
    """
    if isinstance(default, bool):
        try:
            return _FLAG.validate_python(value)
        except pydantic.ValidationError:
            raise EvomergeError(f"{where}: parameter {key!r} must be true or false, got {value!r}") from None
    if isinstance(default, str) or value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise EvomergeError(f"{where}: parameter {key!r} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise EvomergeError(f"{where}: parameter {key!r} must be a finite number, got {value}")
    return value


_FLAG = pydantic.TypeAdapter(bool)


@dataclass(frozen=True)
class Layout:
    """A model's tensor names by place: outside the decoder layers, and per layer below it."""

    outside: tuple[str, ...]  # in storage order
    layers: dict[int, tuple[str, ...]]  # layer index -> names below the layer (``arch.split``), in storage order
    first_shapes: dict[str, tuple[int, ...]]  # name below a layer -> its shape in the first layer having it


_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def layout(model) -> Layout:
    """The ``Layout`` of ``model`` (a ModelDir or a pool model), computed once: every candidate's plan asks."""
    if model not in _LAYOUTS:
        outside, layers = [], {}
        for name in model.names:
            parts = model.arch.split(name)
            if parts is None:
                outside.append(name)
            else:
                layers.setdefault(parts[0], []).append(parts[1])
        first_shapes: dict[str, tuple[int, ...]] = {}
        for layer in sorted(layers):
            for suffix in layers[layer]:
                first_shapes.setdefault(suffix, tuple(model.infos[model.arch.layer_name(layer, suffix)].shape))
        _LAYOUTS[model] = Layout(tuple(outside), {layer: tuple(names) for layer, names in layers.items()},
                                 first_shapes)
    return _LAYOUTS[model]


def _union(groups) -> list[str]:
    """The names of all ``groups``, each once, in first-seen order."""
    return list(dict.fromkeys(name for group in groups for name in group))
