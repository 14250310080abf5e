"""Data-flow genome (Sakana DFS): which layers the hidden state passes through, and at what scale.

The decoder layers of the M source models (all M = Σ L_m of them, in order)
are laid out r times: T = M·r slots. Slot t is on the path when its indicator
gene exceeds ``threshold``; the path runs through the used slots in order, so
layers may repeat (r > 1) and mix sources. The anchor model provides the
embeddings, the first block (always the path's start) and the last block
(always its end), plus the final norm and lm_head.

The hidden state passed into each layer on the path is multiplied by a scale.
``scales: pair`` is Sakana's W: one gene per (from, to) pair of path positions
(start, slots, end), because the best scale depends on where the state comes
from; their ablation lost more than 20% without it. ``slot`` keeps one gene per
destination (T + 1 genes instead of (T + 2)(T + 1)/2); ``none`` fixes all to 1.

The decoded recipe is a mergekit passthrough frankenmerge whose scales are
folded into the output projections (see ``evomerge.materialize.layer_path``),
so the exported model loads in transformers unchanged.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from pydantic import BaseModel, ConfigDict, Field

from evomerge.errors import EvomergeError
from evomerge.recipe import DTYPES, Recipe
from evomerge.spaces.genome import Gene, Genome, check_bounds
from evomerge.spaces.models import PoolModel


class DataflowGenomeConfig(BaseModel):
    """``genome: {type: dataflow, …}`` in a search space."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["dataflow"] = "dataflow"
    #: model providing embeddings, first/last blocks, final norm and lm_head (default: the base).
    anchor: str | None = None
    repeats: int = Field(2, ge=1, strict=True)
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    scales: Literal["pair", "slot", "none"] = "pair"
    scale_bounds: tuple[float, float] = (0.5, 1.5)
    dtype: str | None = None

    def build(self, base: PoolModel, sources: list[PoolModel], seed: int) -> DataflowGenome:
        return DataflowGenome(self, base, sources)


def check_stackable(models: list[PoolModel]) -> set[str]:
    """Refuse models whose layers a path cannot run by reference inside one live model, as their export
    computes: of several dtypes, or computing by their index. Returns the one dtype, as a set."""
    dtypes = {m.path: {m.dir.info(n).dtype for n in m.dir.names} for m in models}
    stored = set().union(*dtypes.values())
    if len(stored) > 1:
        listing = ", ".join(f"{m.label}: {'/'.join(sorted(dtypes[m.path]))}" for m in dict.fromkeys(models))
        raise EvomergeError(f"a data-flow path stacks the models' layers as stored, which takes one dtype, "
                            f"and these differ ({listing}); convert them to one dtype first")
    for m in models:
        on = [flag for flag in m.dir.arch.positional if m.dir.config.get(flag)]
        if on:
            raise EvomergeError(f"{m.path}: config.json sets {on[0]}, so each layer computes according to its "
                                "index; a data-flow path moves layers to other indices and could not be scored "
                                "as its export computes")
    return stored


class DataflowGenome(Genome):
    """See the module doc."""

    def __init__(self, config: DataflowGenomeConfig, base: PoolModel, sources: list[PoolModel]) -> None:
        if config.dtype is not None and config.dtype not in DTYPES:
            raise EvomergeError(f"dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}")
        check_bounds("scale", config.scale_bounds, (0.0, float("inf")))
        if config.scale_bounds[0] <= 0:  # a layer's output projection is divided by the scales before it
            raise EvomergeError(f"scale_bounds {list(config.scale_bounds)}: scales must be positive")
        self.config = config
        by_path = {m.path: m for m in [base, *sources]}
        anchor = base.path if config.anchor is None else config.anchor
        if anchor not in by_path:
            raise EvomergeError(f"anchor {config.anchor!r} is neither the base nor a source of this space")
        self.anchor = by_path[anchor]
        #: the one dtype the models store their tensors in (as a set)
        self.stored = check_stackable([base, self.anchor, *sources])
        if config.dtype is not None and self.stored != {config.dtype}:
            # layers are scored by reference, as stored: an export rounded to another dtype is another model
            raise EvomergeError(
                f"dtype: {config.dtype} is not the models' own ({', '.join(sorted(self.stored))}); a data-flow "
                "candidate is scored with the source layers as they are, so it would not be the model exported. "
                "Leave dtype out (convert the exported model with `evomerge merge` of its recipe.yaml and a dtype)")
        arch = self.anchor.dir.arch
        if config.scales != "none" and not arch.residual_out and config.scale_bounds != (1.0, 1.0):
            # found per candidate, every one would fail: say so when the space is read
            raise EvomergeError(
                f"scales: {config.scales} needs layers whose residual output can be scaled, which "
                f"{self.anchor.dir.config.get('model_type')!r} models do not have (post- or sandwich-norm layers, "
                "MoE experts); use scales: none"
            )
        layers = [(m, i) for m in sources for i in range(m.num_layers)]
        self.slots = layers * config.repeats
        T = len(self.slots)
        self.indicator_genes = [Gene(f"use[{t}]:{m.label}.{i}", 0.0, 1.0) for t, (m, i) in enumerate(self.slots)]
        lo, hi = config.scale_bounds
        # path positions: 0 = anchor's first block, 1..T = slots, T + 1 = anchor's last block
        label = ["start", *(f"{t}" for t in range(T)), "end"]
        # scale_index maps a (from, to) pair of positions to its scale gene
        pairs = [(i, j) for j in range(1, T + 2) for i in range(j)]
        if config.scales == "pair":
            self.scale_index = {pair: k for k, pair in enumerate(pairs)}
            names = [f"scale[{label[i]}->{label[j]}]" for i, j in pairs]
        elif config.scales == "slot":
            self.scale_index = {(i, j): j - 1 for i, j in pairs}
            names = [f"scale[->{label[j]}]" for j in range(1, T + 2)]
        else:
            self.scale_index, names = {}, []
        self.scale_genes = [Gene(n, lo, hi) for n in names]
        self.genes = self.indicator_genes + self.scale_genes

    def x0(self) -> np.ndarray | None:
        """The anchor's own path, when the anchor is a source: its middle layers on, every scale 1.

        A staged search's data-flow stage thus starts at the parameter stage's
        winner and explores from there, instead of from a random half of the slots.
        """
        if all(m.path != self.anchor.path for m, _ in self.slots):
            return None
        anchor_slots = [t for t, (m, i) in enumerate(self.slots[: len(self.slots) // self.config.repeats])
                        if m.path == self.anchor.path and 0 < i < self.anchor.num_layers - 1]
        threshold = self.config.threshold
        x = np.full(self.dim, threshold / 2)
        x[anchor_slots] = (1 + threshold) / 2
        lo, hi = self.config.scale_bounds
        x[len(self.slots):] = min(max((1.0 - lo) / (hi - lo), 0.0), 1.0)
        return x

    def path(self, x) -> list[tuple[int, str, int, float]]:
        """The decoded path: (position, model path, layer, input scale) per step."""
        x = self.check(x)
        T = len(self.slots)
        used = [t for t in range(T) if x[t] > self.config.threshold]
        nodes = [(0, self.anchor.path, 0)] + [(t + 1, self.slots[t][0].path, self.slots[t][1]) for t in used]
        nodes.append((T + 1, self.anchor.path, self.anchor.num_layers - 1))
        steps = []
        previous = None
        for position, model, layer in nodes:
            scale = 1.0
            if previous is not None and self.scale_index:
                k = self.scale_index[(previous, position)]
                scale = self.scale_genes[k].value(x[T + k])
            steps.append((position, model, layer, scale))
            previous = position
        return steps

    def decode(self, x) -> Recipe:
        from evomerge.materialize.layer_path import path_recipe

        steps = self.path(x)
        return path_recipe(
            [(model, layer) for _, model, layer, _ in steps],
            [scale for *_, scale in steps],
            arch=self.anchor.dir.arch,
            dtype=self.config.dtype,
        )
