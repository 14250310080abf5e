"""Uniform random search: the baseline every other backend has to beat.

It never waits and never learns, so it suits any number of workers and any
number of objectives; its only state is the generator's position.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from evomerge.optimize.base import Optimizer


class RandomSearch(Optimizer):
    """Independent uniform draws from the unit box."""

    name = "random"
    asynchronous = True
    multi_objective = True

    def __init__(self, **common: Any) -> None:
        super().__init__(settings={}, **common)
        self._rng = np.random.Generator(np.random.PCG64(self.seed))

    def _propose(self, id: int) -> np.ndarray:
        if id == 0 and self.x0 is not None:
            return self.x0  # the start point itself, without drawing (later draws do not depend on it)
        return self._rng.random(self.dim)

    def _learn(self, id: int, x: np.ndarray, values: list[float] | None) -> None:
        pass  # nothing to learn; the base class already tracked the worst value

    def _get_state(self) -> Any:
        return self._rng.bit_generator.state

    def _set_state(self, state: Any | None) -> None:
        if state is not None:
            self._rng.bit_generator.state = state
