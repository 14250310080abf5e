"""ResidentMerger: turn each search candidate into a live model, in place, without disk.

Built once per worker: the live ``transformers`` model is loaded from the base
directory and every tensor of the pool's models is read once into memory on
the worker's device. ``materialize(recipe)`` then plans the recipe against that
pool, runs the very kernels export runs (so the result equals `evomerge merge`
bit for bit, DARE included for the same seed) and copies each result into the
live model's parameter in place: no model construction, no allocation of a
second model, no file I/O per candidate.

Placement today is "all on device" (pool + live model). Streaming sources from
pinned host memory or disk for models that do not fit, precomputed per-tensor
statistics, and data-flow (layer-path) candidates are the next steps.
"""

from __future__ import annotations

import logging
from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.io.model_dir import ModelDir
from evomerge.materialize.export import run_jobs
from evomerge.materialize.plan import plan_merge
from evomerge.recipe import Recipe

log = logging.getLogger(__name__)


class MaterializeError(EvomergeError):
    """A candidate could not be materialized (bad recipe for this pool, non-finite weights).

    The merger stays usable for the next candidate.
    """


class _ResidentModel:
    """A ModelDir whose tensors were read once and are served from memory."""

    def __init__(self, source: ModelDir, device: str) -> None:
        self.path = source.path
        self.config = source.config
        self.arch = source.arch
        self.infos = source.infos
        self.names = source.names
        self.num_layers = source.num_layers
        self._tensors = {name: source.tensor(name).to(device) for name in source.names}

    def info(self, name: str):
        return self.infos[name]

    def tensor(self, name: str):
        return self._tensors[name]


class ResidentMerger:
    """One live model plus a resident pool of source weights; see the module doc."""

    def __init__(self, base: str | Path, sources: list[str | Path], *, device: str | None = None,
                 threads: int = 2, allow_pickle: bool = False) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from evomerge.perf import keep_freed_memory

        keep_freed_memory()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # CPU: tensors are merged in parallel, one intra-op thread each; CUDA: one stream, in order.
        self.threads = max(1, threads) if self.device == "cpu" else 1
        names = [str(base)] + [str(s) for s in sources if str(s) != str(base)]
        self.pool = {name: _ResidentModel(ModelDir(name, allow_pickle=allow_pickle), self.device) for name in names}
        self.base = str(base)
        self.model = AutoModelForCausalLM.from_pretrained(str(base)).to(self.device).eval()
        # Detached views of the parameters: in-place writes from worker threads need no autograd state.
        self._targets = dict(self.model.state_dict())
        log.info("resident merger on %s: %d models, placement all-on-device", self.device, len(self.pool))

    def materialize(self, recipe: Recipe, *, seed: int | None = None):
        """Write ``recipe``'s merged weights into the live model in place and return it."""
        import torch

        unknown = [m for m in recipe.referenced_models() if m not in self.pool]
        if unknown:
            raise MaterializeError(f"recipe model {unknown[0]!r} is not in the resident pool ({', '.join(self.pool)})")
        plan = plan_merge(recipe, self.pool)
        if plan.num_layers != self.pool[self.base].num_layers:
            raise MaterializeError(
                f"recipe has {plan.num_layers} layers, the live model {self.pool[self.base].num_layers}; "
                "layer-path candidates are not materialized in place yet"
            )
        missing = [job.out_name for job in plan.jobs if job.out_name not in self._targets]
        if missing:
            raise MaterializeError(f"the live model has no tensor {missing[0]!r}")

        def write(job, out) -> None:
            if not bool(torch.isfinite(out).all()):
                raise MaterializeError(f"candidate tensor {job.out_name} has NaN or Inf values")
            self._targets[job.out_name].copy_(out)

        seed = seed if seed is not None else (recipe.random_seed or 0)
        intra = torch.get_num_threads()
        if self.threads > 1:
            torch.set_num_threads(1)
        try:
            run_jobs(plan, write, device=self.device, seed=seed, threads=self.threads)
        finally:
            torch.set_num_threads(intra)
        return self.model
