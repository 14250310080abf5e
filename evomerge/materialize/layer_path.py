"""Data-flow (layer-path) candidates as plain mergekit ``passthrough`` recipes.

Sakana's data-flow merge runs the hidden state through a *path* of decoder
layers picked from several models (a layer may repeat, consecutive layers may
come from different models) and multiplies the hidden state passed into the
k-th layer of the path by a scale ``s_k``::

    x_0 = embed(tokens)
    x_k = L_k(s_k * x_{k-1})            k = 1..n
    logits = head(norm(x_n))

Folding the scales into weights
-------------------------------
In a pre-norm layer ``L(y) = y' + M(N2(y'))`` with ``y' = y + A(N1(y))``, the
input reaches the sublayers only through the norms ``N1``/``N2``. RMSNorm and
LayerNorm are invariant to a positive scale, ``N(c·y) = N(y)`` for ``c > 0``
(exactly without ``eps``; with it, up to replacing ``eps`` by ``eps / c²``).
Let ``L^α`` be ``L`` with its residual-writing output projections (Llama:
``self_attn.o_proj``, ``mlp.down_proj``; GPT-2: ``attn.c_proj``,
``mlp.c_proj``; weights *and* biases — ``ArchMap.residual_out``) multiplied by
``α``, so that ``A^α = α·A`` and ``M^α = α·M``. Then for any ``y``::

    L^α(α·y) = α·y + α·A(N1(α·y)) + ...  = α·y + α·A(N1(y)) + ... = α·L(y)

(the MLP step is the same argument applied to ``y'``). Choose

    α_k = 1 / (s_1 · s_2 · ... · s_k)          (α_0 = 1)

and run the plain stack ``z_k = L_k^{α_k}(z_{k-1})`` with ``z_0 = x_0``. By
induction ``z_{k-1} = α_{k-1}·x_{k-1}``, and since ``α_{k-1} = α_k·s_k`` this is
``α_k·(s_k·x_{k-1})``, so ``z_k = α_k·L_k(s_k·x_{k-1}) = α_k·x_k``: the residual
stream entering layer k is ``α_{k-1}`` times Sakana's stream before scaling,
every sublayer sees exactly Sakana's normalized inputs, and the final norm
removes the last factor: ``norm(z_n) = norm(α_n·x_n) = norm(x_n)``. (Scaling the
projections by the cumulative ``1/Π s`` — not by ``s_k`` — is what makes the
factors telescope.) Scales must be positive: a norm maps ``-y`` to ``-N(y)``.

So a data-flow candidate is an ordinary mergekit recipe::

    merge_method: passthrough
    slices:
    - sources:
      - model: A
        layer_range: [l, l+1]
        parameters:
          scale: [{filter: self_attn.o_proj, value: α}, {filter: mlp.down_proj, value: α}, {value: 1.0}]
    - ...

(``scale`` omitted where ``α == 1``). ``mergekit-yaml`` and ``evomerge merge``
write the folded-weight model, which ``transformers`` loads unchanged;
embeddings come from the first slice's model, final norm and LM head from the
last slice's. The ResidentMerger materializes the same recipe without writing
any weight: it stacks references to the pool's live layers, each wrapped as
``h ↦ α·L(h/α)`` — equal to ``L^α(h)`` by the identity above, up to the same
``eps`` effect (see ``evomerge.materialize.resident``).

Architectures: families whose ``ArchMap.residual_out`` is empty (post-norm or
sandwich-norm layers such as Gemma 2/3 and OLMo 2, whose norms after the output
projection would cancel the scale; MoE experts) take only ``α == 1`` paths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from evomerge.arch import ArchMap
from evomerge.errors import EvomergeError
from evomerge.recipe import NO_MATCH, Recipe, lookup


@dataclass(frozen=True)
class PathStep:
    """One layer of a path: layer ``layer`` of ``model``, output projections scaled by ``alpha``."""

    model: str
    layer: int
    alpha: float = 1.0


def fold_scales(scales: list[float]) -> list[float]:
    """Sakana input scales ``s_k`` → output-projection factors ``α_k = 1 / Π_{i≤k} s_i``."""
    alphas, prod = [], 1.0
    for k, s in enumerate(scales):
        s = float(s)
        if not (math.isfinite(s) and s > 0):
            raise EvomergeError(f"path scale {k} is {s}; input scales must be positive and finite")
        prod *= s
        alphas.append(1.0 / prod)
    return alphas


def input_scales(path: list[PathStep]) -> list[float]:
    """The inverse of ``fold_scales``: ``s_k = α_{k-1} / α_k`` (``α_0 = 1``)."""
    prev, out = 1.0, []
    for step in path:
        out.append(prev / step.alpha)
        prev = step.alpha
    return out


def scale_param(alpha: float, arch: ArchMap) -> list[dict[str, Any]]:
    """The ``scale`` filter list that multiplies ``arch``'s residual-writing projections by ``alpha``."""
    return [{"filter": f, "value": alpha} for f in arch.residual_out] + [{"value": 1.0}]


def path_recipe(steps: list[tuple[str, int]], scales: list[float], *, arch: ArchMap,
                dtype: str | None = None) -> Recipe:
    """The passthrough recipe of a data-flow path (one layer per slice; see the module doc).

    ``steps`` are ``(model path, source layer index)`` in order, ``scales`` the
    input scale ``s_k`` of each step. Layer ranges are checked against the
    models when the recipe is planned or materialized.
    """
    if not steps:
        raise EvomergeError("a layer path needs at least one step")
    if len(steps) != len(scales):
        raise EvomergeError(f"a layer path needs one scale per step: {len(steps)} steps, {len(scales)} scales")
    alphas = fold_scales(scales)
    if not arch.residual_out and any(a != 1.0 for a in alphas):
        raise EvomergeError(
            f"family {arch.family}: its layers have no foldable output projections; only unit scales are supported"
        )
    slices = []
    for (model, layer), alpha in zip(steps, alphas):
        source: dict[str, Any] = {"model": str(model), "layer_range": [int(layer), int(layer) + 1]}
        if alpha != 1.0:
            source["parameters"] = {"scale": scale_param(alpha, arch)}
        slices.append({"sources": [source]})
    data: dict[str, Any] = {"merge_method": "passthrough", "slices": slices}
    if dtype is not None:
        data["dtype"] = dtype
    return Recipe.model_validate(data)


def _scale_at(name: str, t: float, *levels) -> float:
    value = lookup("scale", name, t, *levels)
    if value is NO_MATCH or value is None:
        return 1.0
    try:
        return float(value)
    except (TypeError, ValueError):
        from evomerge.materialize.resident import MaterializeError

        raise MaterializeError(f"scale {value!r} for {name} is not a number") from None


def read_path(recipe: Recipe, pool: Mapping[str, Any]) -> list[PathStep]:
    """The layer path of a ``passthrough`` + ``slices`` recipe, validated against ``pool``.

    ``pool`` maps model names to opened models (``ModelDir`` or the resident
    pool's entries: ``arch``, ``names``, ``num_layers``). Slices may span several
    layers; ``scale`` may be set at any level and in any mergekit form
    (scalar, gradient, filter list) as long as, per layer, it resolves to one
    positive ``α`` on every residual-writing projection tensor and 1 on every
    other tensor — global tensors included. Anything else raises
    ``MaterializeError``: such a candidate is not a data-flow path.
    """
    from evomerge.materialize.resident import MaterializeError

    if recipe.merge_method != "passthrough" or recipe.slices is None:
        raise MaterializeError(f"a layer path is a passthrough recipe with slices, got {recipe.merge_method}")
    suffixes: dict[str, dict[int, list[str]]] = {}
    path: list[PathStep] = []
    for si, sl in enumerate(recipe.slices):
        where = f"slices[{si}]"
        if len(sl.sources) != 1:
            raise MaterializeError(f"{where}: a layer path takes one source per slice, got {len(sl.sources)}")
        (src,) = sl.sources
        if src.model not in pool:
            raise MaterializeError(f"{where}: model {src.model!r} is not in the resident pool ({', '.join(pool)})")
        model = pool[src.model]
        start, end = src.layer_range
        if end > model.num_layers:
            raise MaterializeError(
                f"{where}: layer_range {[start, end]} of {src.model} exceeds its {model.num_layers} layers"
            )
        arch: ArchMap = model.arch
        if src.model not in suffixes:
            by_layer: dict[int, list[str]] = {}
            for parts in map(arch.split, model.names):
                if parts is not None:
                    by_layer.setdefault(parts[0], []).append(parts[1])
            suffixes[src.model] = by_layer
        length = end - start
        for j in range(length):
            t = j / (length - 1) if length > 1 else 1.0  # as plan_merge
            layer = start + j
            alphas: dict[str, float] = {}
            for suffix in suffixes[src.model].get(layer, []):
                name = arch.layer_name(layer, suffix)
                value = _scale_at(name, t, src.parameters, sl.parameters, recipe.parameters)
                if any(f in suffix for f in arch.residual_out):
                    alphas[name] = value
                elif value != 1.0:
                    raise MaterializeError(_only_projections(where, name, value, arch))
            values = set(alphas.values())
            if len(values) > 1:
                listing = ", ".join(f"{n}: {v}" for n, v in alphas.items())
                raise MaterializeError(
                    f"{where}: layer {layer} of {src.model} scales its output projections differently ({listing}); "
                    "a layer path needs one factor per layer"
                )
            alpha = values.pop() if values else 1.0
            if not (math.isfinite(alpha) and alpha > 0):
                raise MaterializeError(
                    f"{where}: layer {layer} of {src.model}: scale {alpha} must be positive and finite"
                )
            path.append(PathStep(src.model, layer, alpha))
    # Embeddings come from the first slice, final norm and head from the last (at t = 0, as plan_merge).
    ends = ((recipe.slices[0], True, "slices[0]"), (recipe.slices[-1], False, f"slices[{len(recipe.slices) - 1}]"))
    for sl, pre, where in ends:
        (src,) = sl.sources
        model = pool[src.model]
        for name in model.names:
            if model.arch.layer_of(name) is None and model.arch.is_pre(name) == pre:
                value = _scale_at(name, 0.0, src.parameters, sl.parameters, recipe.parameters)
                if value != 1.0:
                    raise MaterializeError(_only_projections(where, name, value, model.arch))
    return path


def _only_projections(where: str, name: str, value: float, arch: ArchMap) -> str:
    allowed = (
        f"only output-projection scales ({', '.join(arch.residual_out)}) can be materialized by reference"
        if arch.residual_out
        else f"family {arch.family} has no foldable output projections, so no scale can be materialized by reference"
    )
    return f"{where}: scale {value} on {name}: {allowed}"
