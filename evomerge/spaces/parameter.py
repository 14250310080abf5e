"""Parameter-space genome: per source model × per layer group merge weights, densities, …

For a method such as ``ties``, each source gets one ``weight`` and one
``density`` gene per layer group (``layer_groups: G`` splits the L decoder
layers into G contiguous groups; G = 1 is one value per model, G = L one per
layer). Method-wide parameters (slerp's ``t``, ``lambda``) get one gene per
group. The decoded recipe is plain mergekit: a per-layer value is written as a
gradient list of L anchors, which mergekit interpolates exactly at each layer,
so each layer takes its group's value; embeddings, final norm and lm_head take
the value at t = 0 (group 0), as mergekit does.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from evomerge.errors import EvomergeError
from evomerge.methods.registry import MergeMethod, check_params, get_method
from evomerge.recipe import DTYPES, InputModel, Recipe
from evomerge.spaces.genome import Gene, Genome, check_bounds
from evomerge.spaces.models import PoolModel

#: Methods a parameter genome searches (those with a resident in-place path).
PARAMETER_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                     "breadcrumbs_ties", "della", "della_linear", "slerp")
#: Default bounds of the genes a method has; density > 0 keeps the kernel well defined.
DEFAULT_BOUNDS = {"weight": (0.0, 1.0), "density": (0.1, 1.0), "t": (0.0, 1.0)}
#: Hard ranges a gene's bounds must stay in.
VALID_RANGE = {"density": (1e-6, 1.0), "t": (0.0, 1.0), "epsilon": (0.0, 1.0)}


class ParameterGenomeConfig(BaseModel):
    """``genome: {type: parameter, …}`` in a search space."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["parameter"] = "parameter"
    method: str = "ties"
    layer_groups: int = Field(1, ge=1, strict=True)
    #: gene name -> [low, high]; default: the method's weight/density/t with DEFAULT_BOUNDS.
    genes: dict[str, tuple[float, float]] | None = None
    #: fixed (not searched) method-wide parameters, e.g. {normalize: true, lambda: 1.0}.
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str | None = None

    def build(self, base: PoolModel, sources: list[PoolModel], seed: int) -> ParameterGenome:
        return ParameterGenome(self, base, sources, seed)


class ParameterGenome(Genome):
    """See the module doc."""

    def __init__(self, config: ParameterGenomeConfig, base: PoolModel, sources: list[PoolModel], seed: int) -> None:
        if config.method not in PARAMETER_METHODS:
            raise EvomergeError(
                f"method {config.method!r} cannot be searched; choose one of {', '.join(PARAMETER_METHODS)}"
            )
        if config.dtype is not None and config.dtype not in DTYPES:
            raise EvomergeError(f"dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}")
        method = get_method(config.method)
        if config.method == "slerp" and len(sources) != 1:
            raise EvomergeError(f"method slerp interpolates the base with exactly one source, got {len(sources)}")
        self.config, self.base, self.sources, self.seed, self.method = config, base, sources, seed, method
        self.num_layers = base.num_layers
        for m in sources:
            if m.num_layers != self.num_layers:
                raise EvomergeError(
                    f"parameter genome: {m.path} has {m.num_layers} layers, the base {self.num_layers}; "
                    "merge models of equal depth (use a dataflow genome to stack layers)"
                )
        if config.layer_groups > self.num_layers:
            raise EvomergeError(f"layer_groups {config.layer_groups} exceeds the models' {self.num_layers} layers")
        valid = set(method.source_params) | set(method.global_params)
        check_params(method, list(config.parameters), "parameters")
        searched = config.genes
        if searched is None:
            searched = {k: v for k, v in DEFAULT_BOUNDS.items() if k in valid}
        for name, bounds in searched.items():
            if name not in valid:
                raise EvomergeError(
                    f"genes: {config.method} has no parameter {name!r}; valid: {', '.join(sorted(valid))}"
                )
            check_bounds(name, bounds, VALID_RANGE.get(name))
        clash = sorted(set(searched) & set(config.parameters))
        if clash:
            raise EvomergeError(f"{clash[0]!r} is both searched (genes) and fixed (parameters)")
        if "epsilon" in valid:
            searched = _della_density(searched, config, method)
        if not searched:
            raise EvomergeError("genes: none to search; give at least one parameter with [low, high] bounds, "
                                "or leave genes out for the method's defaults")
        self.per_source = [k for k in searched if k in method.source_params]
        self.per_group = [k for k in searched if k not in method.source_params]
        groups = config.layer_groups
        suffix = (lambda g: f"[g{g}]") if groups > 1 else (lambda g: "")
        self.genes = [
            Gene(f"{m.label}.{p}{suffix(g)}", *searched[p]) for m in sources for p in self.per_source for g in range(groups)
        ] + [Gene(f"{p}{suffix(g)}", *searched[p]) for p in self.per_group for g in range(groups)]

    def check_plan(self) -> None:
        """Plan the recipe of the box centre against the models' headers: fixed ``parameters`` of the wrong
        kind (a word for ``lambda``) or range are refused before a run, not by every candidate."""
        import numpy as np

        from evomerge.materialize.plan import plan_merge

        models = {m.path: m.dir for m in (self.base, *self.sources)}
        plan_merge(self.decode(np.full(self.dim, 0.5)), models, where="parameters")

    @property
    def groups(self) -> list[list[int]] | None:
        """The decoder layers of each layer group (None for a single group)."""
        groups, layers = self.config.layer_groups, self.num_layers
        if groups == 1:
            return None
        return [[i for i in range(layers) if i * groups // layers == g] for g in range(groups)]

    def _per_layer(self, group_values: list[float]) -> float | list[float]:
        """A scalar for one group, else one gradient anchor per layer holding its group's value."""
        if len(group_values) == 1:
            return group_values[0]
        groups, layers = len(group_values), self.num_layers
        return [group_values[i * groups // layers] for i in range(layers)]

    def decode(self, x) -> Recipe:
        values = list(self.values(x).values())
        groups = self.config.layer_groups
        take = iter(range(len(values)))

        def next_groups() -> list[float]:
            return [values[next(take)] for _ in range(groups)]

        models = [
            InputModel(model=m.path, parameters={p: self._per_layer(next_groups()) for p in self.per_source})
            for m in self.sources
        ]
        parameters = dict(self.config.parameters)
        parameters.update({p: self._per_layer(next_groups()) for p in self.per_group})
        uses_base = self.method.base != "none"
        return Recipe(
            merge_method=self.config.method,
            base_model=self.base.path if uses_base else None,
            models=models,
            parameters=parameters,
            dtype=self.config.dtype,
            random_seed=self.seed if self.method.random else None,
        )


def _della_density(searched: dict[str, tuple[float, float]], config: ParameterGenomeConfig,
                   method: MergeMethod) -> dict[str, tuple[float, float]]:
    """Density bounds that DELLA accepts with every epsilon of the space (0 < density - epsilon and
    density + epsilon < 1): the default ones are narrowed to fit, given ones that do not fit are refused."""
    fixed = config.parameters.get("epsilon", method.source_params["epsilon"])
    eps = searched["epsilon"][1] if "epsilon" in searched else fixed
    if not isinstance(eps, (int, float)) or "density" not in searched:
        return searched  # a gradient or filter list, or a fixed density: planning checks it per tensor
    low, high = searched["density"]
    if config.genes is None or "density" not in config.genes:
        low, high = max(low, eps + 0.05), min(high, 1 - eps - 0.05)
        if low < high:
            return {**searched, "density": (round(low, 6), round(high, 6))}
    if not (low > eps and high + eps < 1):
        raise EvomergeError(f"genes: {config.method} needs 0 < density - epsilon and density + epsilon < 1; with "
                            f"epsilon up to {eps}, density bounds [{low}, {high}] reach outside "
                            f"({eps}, {round(1 - eps, 6)}): give density bounds inside it, or a smaller epsilon")
    return searched
