"""A search worker: one resident merger and the objective's evaluators, scoring candidates.

The same class runs in-process (``--local``) or as a Ray actor. Everything a
candidate can do wrong (a recipe the pool cannot build, NaN weights, an
evaluator that raises or returns non-numbers, out-of-memory) comes back as a
failed result; the worker stays usable for the next candidate.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from typing import Any

log = logging.getLogger(__name__)


class EvalWorker:
    """Holds the live model, tokenizer and evaluators of one worker."""

    def __init__(self, space: dict[str, Any], worker_id: int, *, device: str | None = None, threads: int | None = None,
                 sharing: int = 1) -> None:
        self.worker_id = worker_id
        self.pid = os.getpid()
        self._args = (space, device, threads, sharing)

    def start(self) -> dict[str, Any]:
        """Load the pool and set up the evaluators; returns ``info()``, or ``{"error": msg}`` for bad config.

        Kept out of ``__init__`` so a configuration error reaches the driver as
        one clear message instead of a dead actor's traceback.
        """
        from evomerge.errors import EvomergeError

        try:
            self._start(*self._args)
        except EvomergeError as exc:
            return {"error": str(exc)}
        except Exception as exc:  # noqa: BLE001 -- e.g. a model directory transformers cannot build
            log.debug("worker %d failed to start:\n%s", self.worker_id, traceback.format_exc())
            return {"error": f"a worker failed to start: {type(exc).__name__}: {exc}"}
        return self.info()

    def _start(self, space: dict[str, Any], device: str | None, threads: int | None, sharing: int) -> None:
        begin = time.perf_counter()
        import torch

        from evomerge.device import check_device
        from evomerge.errors import prefixed
        from evomerge.evaluation.objective import builtin_metrics, check_reports
        from evomerge.evaluation.registry import build_evaluator
        from evomerge.io.live import load_tokenizer
        from evomerge.materialize.resident import ResidentMerger
        from evomerge.spaces.space import SearchSpace

        if device:
            check_device(device)  # a CUDA device on a machine without one: one line, not torch's assertion
        if threads:
            torch.set_num_threads(threads)
        libraries = time.perf_counter()
        space_obj = SearchSpace.model_validate(space)
        self.merger = ResidentMerger(space_obj.models.base, list(space_obj.models.sources), device=device,
                                     threads=threads or torch.get_num_threads(), placement=space_obj.placement,
                                     sharing=sharing)
        self.tokenizer = load_tokenizer(space_obj.models.base)
        models = time.perf_counter()
        self.evaluators = {"full": [build_evaluator(spec) for spec in space_obj.objective.evaluators]}
        if space_obj.surrogate is not None:
            self.evaluators["surrogate"] = [build_evaluator(spec) for spec in space_obj.surrogate.evaluators]
        for mode, evaluators in self.evaluators.items():
            for i, evaluator in enumerate(evaluators):
                with prefixed(f"{'objective' if mode == 'full' else mode}.evaluators[{i}]"):
                    evaluator.setup(self.merger.model, self.tokenizer)
        builtin = set(builtin_metrics(self.merger.model))
        check_reports(self.evaluators["full"], space_obj.objective.fitness, builtin, "objective")
        if space_obj.surrogate is not None:
            check_reports(self.evaluators["surrogate"], [space_obj.surrogate], builtin, "surrogate")
        # where a worker's start-up went (model code and lm-eval are imported on first use, so they
        # count under models and evaluators)
        self.startup = {"libraries": libraries - begin, "models": models - libraries,
                        "evaluators": time.perf_counter() - models}

    def info(self) -> dict[str, Any]:
        """Where this worker runs and its memory plan (shown at start), its start-up seconds by stage."""
        return {"worker": self.worker_id, "pid": self.pid, "device": self.merger.device, "startup": self.startup,
                "memory": self.merger.memory.describe()}

    def evaluate(self, candidate_id: int, recipe: dict[str, Any], mode: str = "full") -> dict[str, Any]:
        """Materialize and score one candidate; never raises for a bad candidate.

        ``mode`` picks the evaluators: ``full`` (the objective's) or ``surrogate`` (screening).
        """
        import torch

        from evomerge.errors import EvomergeError
        from evomerge.evaluation.objective import builtin_metrics
        from evomerge.recipe import Recipe

        start = time.perf_counter()
        result: dict[str, Any] = {"id": candidate_id, "worker": self.worker_id, "metrics": {}, "error": None,
                                  "started": time.time()}
        try:
            model = self.merger.materialize(Recipe.model_validate(recipe))
            metrics = builtin_metrics(model)
            for evaluator in self.evaluators[mode]:
                scores = evaluator(model, self.tokenizer)
                clash = sorted(set(scores) & set(metrics))
                if clash:
                    raise EvomergeError(f"two evaluators report metric {clash[0]!r}; rename one")
                metrics.update(scores)
            result.update(status="ok", metrics=metrics)
        except torch.OutOfMemoryError as exc:
            result.update(status="oom", error=f"out of memory: {exc}")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except EvomergeError as exc:
            result.update(status="failed", error=str(exc))
        except Exception as exc:  # failures are data: an unexpected bug fails this candidate, not the run
            log.debug("candidate %d failed:\n%s", candidate_id, traceback.format_exc())
            result.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        result["seconds"] = time.perf_counter() - start
        result["finished"] = time.time()
        return result
