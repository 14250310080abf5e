"""CMA-ES through pycma, as in Sakana's evolutionary model merge.

Defaults follow the paper: mean 0.5 in every gene, step size 1/6 (the box is
about six sigmas wide), pycma's default population ``4 + floor(3 ln dim)``,
and pycma's ``BoundTransform`` for the unit box. A genome's start point (``x0``)
is the mean and, injected, the first candidate of the first generation.

pycma is generational: ``ask`` hands out the points of one ``es.ask()`` one by
one and returns None once all are out but not all told (the barrier). When the
last one is told, the whole generation goes to ``es.tell`` in ask order, and the
next ``ask`` starts a new generation. Failed candidates are scored at that point
with the worst value of the run so far, this generation included.

pycma's own stop conditions (``es.stop()``) are not consulted: the search keeps
asking until the run's budget ends it.

Exact resume: pycma draws its normals from NumPy's global RNG by default, which
its pickle does not capture; here it gets its own seeded ``Generator`` through
the ``randn`` option, so the pickled strategy carries its RNG along.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from evomerge.optimize.base import Optimizer, check_int_setting, check_positive_setting


class _Randn:
    """pycma's ``randn(lam, N)`` on a private generator; picklable, unlike a lambda."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


class CmaEs(Optimizer):
    """pycma's CMA-ES, generational, single-objective."""

    name = "cmaes"
    asynchronous = False
    multi_objective = False

    def __init__(self, *, popsize: int | None = None, sigma0: float = 1 / 6, **common: Any) -> None:
        check_int_setting(self.name, "popsize", popsize, 2)
        check_positive_setting(self.name, "sigma0", sigma0)
        super().__init__(settings={"popsize": popsize, "sigma0": sigma0}, **common)
        import cma

        opts: dict[str, Any] = {
            "bounds": [0.0, 1.0],
            "randn": _Randn(self.seed),
            "seed": np.nan,  # "leave the global RNG alone": ours is in randn
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
        }
        if popsize is not None:
            opts["popsize"] = popsize
        mean = np.full(self.dim, 0.5) if self.x0 is None else self.x0
        self._es = cma.CMAEvolutionStrategy(mean, float(sigma0), opts)
        if self.x0 is not None:
            # the start point itself is the first candidate (as the other optimizers do): centring on it
            # alone would never score it, and a staged run's winner could then be lost to worse paths
            self._es.inject([self.x0], force=True)
        # The current generation: es.ask()'s points (unclipped: es.tell wants them back as
        # they were), their ids in ask order, and the results told so far.
        self._batch: list[np.ndarray] = []
        self._ids: list[int] = []
        self._results: dict[int, list[float] | None] = {}

    @property
    def popsize(self) -> int:
        """Points per generation."""
        return int(self._es.popsize)

    def _propose(self, id: int) -> np.ndarray | None:
        if len(self._ids) == len(self._batch):
            if self._ids:
                return None  # all handed out, some not told yet
            self._batch = self._es.ask()
        self._ids.append(id)
        # BoundTransform keeps points in the box up to rounding.
        return np.clip(self._batch[len(self._ids) - 1], 0.0, 1.0)

    def _learn(self, id: int, x: np.ndarray, values: list[float] | None) -> None:
        self._results[id] = values
        if len(self._results) < len(self._batch):
            return
        # The worst value is taken now, so it covers the whole generation.
        failed = self.failure_values()
        sign = -1.0 if self.directions[0] == "maximize" else 1.0  # pycma minimizes
        losses = [sign * (failed if self._results[i] is None else self._results[i])[0] for i in self._ids]
        self._es.tell(self._batch, losses)
        self._batch, self._ids, self._results = [], [], {}

    def _get_state(self) -> Any:
        # es.tell finds its points by value, so the batch is kept exactly as es.ask() returned it.
        return {"es": self._es, "batch": self._batch, "ids": self._ids, "results": self._results}

    def _set_state(self, state: Any | None) -> None:
        if state is not None:
            self._es = state["es"]
            self._batch, self._ids, self._results = state["batch"], state["ids"], state["results"]
