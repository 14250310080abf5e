"""The functional merge AdaMerging trains, and the mergekit recipe it exports.

Coefficient granularity:

``task``
    one coefficient per task (task-wise AdaMerging);
``layer``
    one per task per decoder layer, plus one for the global tensors (embeddings,
    final norm);
``tensor``
    one per task per parameter tensor (what the reference code calls layer-wise).

**AdaMerging++** starts from TIES-trimmed task vectors (top ``density`` by
magnitude per tensor) and keeps, per entry, only the task vectors whose sign
agrees with the elected sign. The sign is elected on the coefficient-weighted
sum, exactly as mergekit's ``ties`` with ``normalize: false`` does, so the
exported recipe reproduces the trained model (the reference code elects once
on the unweighted sum).

The exported recipe is ``task_arithmetic`` (``ties`` for ++) with per-source
``weight`` as a scalar or a ``{filter, value}`` list (one entry per layer
prefix or tensor name). Head tensors kept per task get weight 0, so the
merged model keeps the base's head.
"""

from __future__ import annotations

from pathlib import Path

import torch

from evomerge.errors import EvomergeError
from evomerge.recipe import Recipe

GRANULARITIES = ("task", "layer", "tensor")
#: Group label of the tensors outside the decoder layers under ``layer`` granularity.
GLOBALS = "globals"


class FunctionalMerge:
    """Merged tensors as a differentiable function of the coefficients.

    Holds the base tensors and the stacked (for ++, trimmed) task vectors of
    every merged tensor once, on the model's device.
    """

    def __init__(self, base_dir: str | Path, sources: list[str | Path], *, granularity: str,
                 plus_plus: bool = False, density: float = 0.2, exclude: set[str] = frozenset(),
                 device: str = "cpu") -> None:
        from evomerge.io.model_dir import ModelDir
        from evomerge.methods import sparsify

        if granularity not in GRANULARITIES:
            raise EvomergeError(f"adamerging: granularity must be one of {', '.join(GRANULARITIES)}, not {granularity!r}")
        base = ModelDir(base_dir)
        models = [ModelDir(s) for s in sources]
        self.arch = base.arch
        self.granularity = granularity
        self.plus_plus = plus_plus
        self.density = density
        self.names: list[str] = []
        self.base: dict[str, torch.Tensor] = {}
        self.deltas: dict[str, torch.Tensor] = {}
        for name in base.names:
            if name in exclude:
                continue
            for m in models:
                if name not in m.infos:
                    raise EvomergeError(f"{m.path}: tensor {name!r} of the base model is missing")
                if m.infos[name].shape != base.infos[name].shape:
                    raise EvomergeError(
                        f"{m.path}: tensor {name!r} has shape {list(m.infos[name].shape)}, "
                        f"the base has {list(base.infos[name].shape)}"
                    )
            b = base.tensor(name).to(device=device, dtype=torch.float32)
            stacked = torch.stack([m.tensor(name).to(device=device, dtype=torch.float32) - b for m in models])
            if plus_plus:
                for row in stacked:
                    sparsify.magnitude(row, density)
            self.names.append(name)
            self.base[name] = b
            self.deltas[name] = stacked
        self.groups, self.group_of = _groups(self.names, self.arch, granularity)
        self.num_sources = len(models)

    def tensors(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """Merged tensors for ``coefficients`` (``[sources, groups]``), differentiable in them."""
        out = {}
        for name in self.names:
            lam = coefficients[:, self.group_of[name]]
            delta = self.deltas[name]
            weighted = lam.view(-1, *([1] * (delta.dim() - 1))) * delta
            if self.plus_plus:
                # mergekit ties, normalize false: keep each entry's agreeing (weighted) deltas
                elected = weighted.detach().sum(0).sign().add(0.5).sign()
                mixed = (weighted * elected).relu().sum(0) * elected
            else:
                mixed = weighted.sum(0)
            out[name] = self.base[name] + mixed
        return out


def _groups(names: list[str], arch, granularity: str) -> tuple[list[str], dict[str, int]]:
    """Coefficient groups and each tensor's group index."""
    if granularity == "task":
        return ["all"], {n: 0 for n in names}
    if granularity == "tensor":
        return list(names), {n: i for i, n in enumerate(names)}
    layers = sorted({arch.layer_of(n) for n in names} - {None})
    labels = [GLOBALS] + [f"{arch.layer_prefix}{i}." for i in layers]
    index = {label: i for i, label in enumerate(labels)}
    return labels, {n: index[GLOBALS if arch.layer_of(n) is None else f"{arch.layer_prefix}{arch.layer_of(n)}."]
                    for n in names}


def _weight_value(row: torch.Tensor, groups: list[str], granularity: str, heads: list[str]):
    """One source's ``weight`` parameter: a scalar, or a ``{filter, value}`` list."""
    values = [round(float(v), 6) for v in row]
    entries = [{"filter": h, "value": 0.0} for h in heads]
    if granularity == "task":
        if not entries:
            return values[0]
        return [*entries, {"value": values[0]}]
    if granularity == "tensor":
        # Longest names first: a name that is a substring of another must not capture it.
        order = sorted(range(len(groups)), key=lambda i: -len(groups[i]))
        entries += [{"filter": groups[i], "value": values[i]} for i in order]
        return entries
    entries += [{"filter": g, "value": v} for g, v in zip(groups[1:], values[1:])]
    return [*entries, {"value": values[0]}]


def recipe_for(merge: FunctionalMerge, base: str | Path, sources: list[str], coefficients: torch.Tensor, *,
               heads: list[str] = ()) -> Recipe:
    """The mergekit recipe that reproduces ``merge`` at ``coefficients`` (``[sources, groups]``)."""
    models = []
    for source, row in zip(sources, coefficients):
        params = {"weight": _weight_value(row, merge.groups, merge.granularity, list(heads))}
        if merge.plus_plus:
            params["density"] = merge.density
        models.append({"model": str(source), "parameters": params})
    method = "ties" if merge.plus_plus else "task_arithmetic"
    parameters = {"normalize": False, "lambda": 1.0}
    return Recipe.model_validate({"merge_method": method, "base_model": str(base), "models": models,
                                  "parameters": parameters, "dtype": "float32"})


def coefficients_from_recipe(recipe: Recipe, base: str | Path, sources: list[str], merge: FunctionalMerge
                             ) -> torch.Tensor:
    """Initial coefficients from a parameter-space recipe: each group's mean weight per source.

    The recipe must merge the same base and sources with per-source ``weight``
    parameters (task_arithmetic, ties, dare_*), as evolved parameter-space
    recipes do. The start is each source's effective task-vector scale
    (``lambda`` times weight, over the weights' sum when ``normalize``); a
    recipe's sparsification is not carried over (use ++ for TIES-like merges).
    """
    from evomerge.materialize.plan import open_models, plan_merge

    if recipe.slices is not None or recipe.models is None:
        raise EvomergeError("adamerging --init: the recipe is a frankenmerge (slices); need a parameter-space recipe")

    def same(a, b) -> bool:
        return Path(a).resolve() == Path(b).resolve()

    if recipe.base_model is None or not same(recipe.base_model, base):
        raise EvomergeError(f"adamerging --init: the recipe's base_model is {recipe.base_model}, not {base}")
    named = {str(m.model): next((s for s in sources if same(m.model, s)), None) for m in recipe.models}
    if None in named.values() or len(named) != len(sources):
        raise EvomergeError(
            f"adamerging --init: the recipe merges {list(named)}, the tasks' models are {list(map(str, sources))}"
        )
    plan = plan_merge(recipe, open_models(recipe), where="--init recipe")
    sums = torch.zeros(len(sources), len(merge.groups))
    counts = torch.zeros(len(merge.groups))
    for job in plan.jobs:
        if job.out_name not in merge.group_of or "weight" not in job.kwargs:
            continue
        g = merge.group_of[job.out_name]
        weights = [float(w) for w in job.kwargs["weight"]]
        total = sum(weights)
        if job.kwargs.get("normalize") and abs(total) > 1e-8:
            weights = [w / total for w in weights]  # the scale a normalized merge applies, before lambda
        weights = [w * float(job.kwargs.get("lambda_", 1.0)) for w in weights]
        by_source = {named[model]: w for (model, _), w in zip(job.sources, weights)}
        for k, source in enumerate(sources):
            sums[k, g] += float(by_source[source])
        counts[g] += 1
    if not bool((counts > 0).all()):
        raise EvomergeError(f"adamerging --init: the recipe's method {recipe.merge_method} has no per-source weights")
    return sums / counts
