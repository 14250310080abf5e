"""Where candidates are evaluated: a pool of Ray actors, or this process.

The Ray pool is driven by an explicit ``ray.wait`` over in-flight evaluations
(not ``ray.util.ActorPool``, whose stuck-pool and dead-actor bugs we cannot
afford): a worker is refilled the moment it finishes, and a dead worker is
reported so the runner can replace it and retry its candidate.
"""

from __future__ import annotations

import gc
import logging
import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.run.worker import EvalWorker

log = logging.getLogger(__name__)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes in Ray's messages


@dataclass
class Candidate:
    """An asked genome on its way to a worker."""

    id: int
    x: np.ndarray
    genes: dict[str, float]
    recipe: dict[str, Any]
    attempts: int = 0
    #: why the genome did not decode to a recipe (the candidate fails without reaching a worker)
    decode_error: str | None = None
    #: "full" (the objective's evaluators) or "surrogate" (the screening score only)
    mode: str = "full"


@dataclass
class Finished:
    """A worker's answer: a result dict, or ``lost`` when the worker died on the way."""

    worker: int
    candidate: Candidate
    result: dict[str, Any] | None
    lost: str | None = None


class Executor(ABC):
    """Runs candidates on ``workers`` workers; the runner decides what runs where."""

    workers: int
    device: str

    @abstractmethod
    def start(self) -> list[dict[str, Any]]:
        """Start every worker; returns their ``info()`` dicts."""

    @abstractmethod
    def submit(self, worker: int, candidate: Candidate) -> None:
        """Start evaluating ``candidate`` on the idle ``worker``."""

    @abstractmethod
    def wait(self, timeout: float) -> list[Finished]:
        """Finished evaluations, waiting at most ``timeout`` seconds for the first."""

    @abstractmethod
    def replace(self, worker: int) -> dict[str, Any]:
        """Start a fresh worker in place of a dead one."""

    def shutdown(self) -> None:
        """Stop the workers (in-flight evaluations are abandoned; resume re-runs them)."""


def _started(info: dict[str, Any]) -> dict[str, Any]:
    if "error" in info:
        raise EvomergeError(info["error"])
    return info


class LocalExecutor(Executor):
    """One worker in this process, evaluating synchronously (debugging, small CI runs)."""

    def __init__(self, space: dict[str, Any], *, device: str | None = None) -> None:
        import torch

        self.workers = 1
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._worker = EvalWorker(space, 0, device=self.device)
        self._queue: list[Candidate] = []

    def start(self) -> list[dict[str, Any]]:
        return [_started(self._worker.start())]

    def submit(self, worker: int, candidate: Candidate) -> None:
        self._queue.append(candidate)

    def wait(self, timeout: float) -> list[Finished]:
        done = [Finished(0, c, self._worker.evaluate(c.id, c.recipe, c.mode)) for c in self._queue]
        self._queue.clear()
        return done

    def replace(self, worker: int) -> dict[str, Any]:
        raise EvomergeError("the in-process worker cannot be replaced")

    def shutdown(self) -> None:
        """Drop the worker and give its memory (the pool, the live model) back to the OS: the export of
        the best that follows in this process needs it."""
        from evomerge.perf import release_freed_memory

        self._worker = None
        gc.collect()
        release_freed_memory()


def _join(address: str | None, kwargs: dict[str, Any]) -> None:
    """``ray.init``, with one clear error instead of a hang or a traceback when the cluster is not there."""
    import socket

    import ray

    where = f"--address {address}"
    hint = "start one with `ray start --head`, or leave out --address to run a local one"
    host, sep, port = (address or "").rpartition(":")
    if sep and host and port.isdigit() and "://" not in address:
        # Ray retries an unreachable GCS for minutes, printing warnings: find out first
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as exc:
            raise EvomergeError(f"{where}: no Ray cluster answers there ({exc.strerror or exc}); {hint}") from None
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as exc:
        raise EvomergeError(f"{where}: {str(exc).splitlines()[0]}; {hint}") from None
    except ValueError as exc:
        if "ray[client]" not in str(exc):
            raise
        raise EvomergeError(f"{where}: ray:// addresses need Ray's client: pip install 'ray[client]'") from None


class RayExecutor(Executor):
    """A pool of ``EvalWorker`` Ray actors on a local or existing Ray cluster.

    ``threads``: intra-op threads per worker; default the cluster's CPUs divided
    among the workers.
    """

    def __init__(self, space: dict[str, Any], workers: int, *, address: str | None = None,
                 device: str | None = None, threads: int | None = None) -> None:
        import ray

        if not ray.is_initialized():
            kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False,
                                          logging_level=logging.WARNING, configure_logging=False)
            if address is None:
                # a local cluster sized to this machine; joining one takes its own resources
                kwargs["num_cpus"] = os.cpu_count() or 1
            _join(address, kwargs)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        self.device = device or ("cuda" if gpus > 0 else "cpu")
        if self.device == "cuda" and gpus < 1:
            raise EvomergeError("device cuda was asked for, but the Ray cluster has no GPUs")
        self.workers = workers
        cpus = max(1.0, resources.get("CPU", 1.0))
        self._threads = threads or max(1, int(cpus // workers))
        self._options = {"num_cpus": min(1.0, cpus / workers), "num_gpus": 1 if self.device == "cuda" else 0,
                         "max_restarts": 0, "max_concurrency": 1}
        self._space = space
        # workers on one node start together and split its memory: each plans with its share
        nodes = max(1, sum(1 for node in ray.nodes() if node.get("Alive")))
        self._sharing = -(-workers // nodes)
        self._actors: list[Any] = [None] * workers
        self._inflight: dict[Any, tuple[int, Candidate]] = {}

    def _spawn(self, worker: int):
        import ray

        cls = ray.remote(EvalWorker).options(**self._options)
        actor = cls.remote(self._space, worker, device=self.device, threads=self._threads, sharing=self._sharing)
        self._actors[worker] = actor
        return actor.start.remote()

    def start(self) -> list[dict[str, Any]]:
        import ray

        refs = [self._spawn(i) for i in range(self.workers)]
        try:
            return [_started(info) for info in ray.get(refs)]
        except ray.exceptions.RayError as exc:
            raise EvomergeError(f"a worker failed to start: {_first_line(exc)}") from None

    def submit(self, worker: int, candidate: Candidate) -> None:
        ref = self._actors[worker].evaluate.remote(candidate.id, candidate.recipe, candidate.mode)
        self._inflight[ref] = (worker, candidate)

    def wait(self, timeout: float) -> list[Finished]:
        import ray

        if not self._inflight:
            return []
        ready, _ = ray.wait(list(self._inflight), num_returns=1, timeout=timeout)
        out = []
        for ref in ready:
            worker, candidate = self._inflight.pop(ref)
            try:
                out.append(Finished(worker, candidate, ray.get(ref)))
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                out.append(Finished(worker, candidate, None, lost=_first_line(exc)))
            except ray.exceptions.RayTaskError as exc:  # a bug escaping evaluate(): the candidate's failure
                out.append(Finished(worker, candidate, {"status": "failed", "error": _first_line(exc), "metrics": {},
                                                        "worker": worker, "seconds": 0.0}))
        return out

    def replace(self, worker: int) -> dict[str, Any]:
        import ray

        try:
            ray.kill(self._actors[worker], no_restart=True)
        except Exception:  # already gone is fine
            pass
        return _started(ray.get(self._spawn(worker)))

    def shutdown(self) -> None:
        import ray

        self._inflight.clear()  # killing the actors abandons them
        for actor in self._actors:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        ray.shutdown()


def _first_line(exc: BaseException) -> str:
    """What went wrong in one line: for a remote task, its own exception (Ray's first line names only the task)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, EvomergeError):
        text = str(cause)
    elif isinstance(cause, BaseException):
        text = f"{type(cause).__name__}: {cause}"
    else:
        text = str(exc)
    text = _ANSI.sub("", text).strip()
    return text.splitlines()[0] if text else type(exc).__name__
