"""What every genome is: named genes in [0, 1] and a pure decode to a Recipe."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.recipe import Recipe


@dataclass(frozen=True)
class Gene:
    """One coordinate of the genome: optimizers see [0, 1], the recipe sees [low, high]."""

    name: str
    low: float
    high: float

    def value(self, u: float) -> float:
        """The gene's value in its own units for a coordinate ``u`` in [0, 1]."""
        return self.low + float(u) * (self.high - self.low)


class Genome(ABC):
    """A vector in [0, 1]^d and how it becomes a Recipe.

    Optimizers only ever see the unit box; bounds live in the genes, so every
    optimizer stays generic and the decoded recipe is what the journal stores.
    """

    genes: list[Gene]

    @property
    def dim(self) -> int:
        return len(self.genes)

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.genes]

    def check(self, x) -> np.ndarray:
        """``x`` as a float vector of the right length inside the unit box."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (self.dim,):
            raise EvomergeError(f"genome has {self.dim} genes, got a vector of shape {list(x.shape)}")
        if not np.all((x >= 0) & (x <= 1)):
            bad = int(np.argmax((x < 0) | (x > 1)))
            raise EvomergeError(f"gene {self.genes[bad].name} = {x[bad]} is outside [0, 1]")
        return x

    def values(self, x) -> dict[str, float]:
        """Gene name -> value in the gene's own units (what the journal records)."""
        x = self.check(x)
        return {g.name: g.value(u) for g, u in zip(self.genes, x)}

    def x0(self) -> np.ndarray | None:
        """Where a search should start, if the genome has a natural start point (None: the box centre)."""
        return None

    @abstractmethod
    def decode(self, x) -> Recipe:
        """The recipe this genome vector stands for (pure: same x, same recipe)."""


def check_bounds(name: str, bounds: tuple[float, float], allowed: tuple[float, float] | None = None) -> None:
    """Reject empty or out-of-range gene bounds with a message naming the gene."""
    low, high = bounds
    if not (math.isfinite(low) and math.isfinite(high)):
        raise EvomergeError(f"gene {name}: bounds [{low}, {high}] must be finite numbers")
    if not low < high:
        raise EvomergeError(f"gene {name}: bounds [{low}, {high}] are empty; give [low, high] with low < high")
    if allowed is not None and (low < allowed[0] or high > allowed[1]):
        raise EvomergeError(f"gene {name}: bounds [{low}, {high}] leave the valid range [{allowed[0]}, {allowed[1]}]")
