"""Memory plan of a resident merger: where the pool of source weights lives.

Real searches merge 7B+ models, where the base, N sources, the live model and
the merge workspace may not all fit on the device. Three placements:

``device``
    every pool tensor on the worker's device: no transfer per candidate.
``host``
    the pool in pinned host memory, streamed to the device block by block for
    each candidate (CUDA only; on a CPU worker host memory is the device).
``disk``
    nothing held: each candidate reads its blocks from the model files
    (the OS page cache keeps what fits).

``auto`` picks the first that fits, from the models' sizes (safetensors
headers) and the free memory, and the plan says why. Every placement holds
the live model and the merge workspace on the device; when those alone do not
fit, ``auto`` refuses, and a forced placement that does not fit says so.
Workers started together on one machine share its host memory (on a CPU, their
device): each plans with its share.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from evomerge.errors import EvomergeError

PLACEMENTS = ("auto", "device", "host", "disk")
#: Share of the free memory a plan may take; the rest is head room for activations and the allocator.
HEADROOM = 0.85


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


@dataclass(frozen=True)
class MemoryPlan:
    """The placement chosen for a pool and the sizes it was chosen from (bytes)."""

    placement: str
    device: str
    pool_bytes: int
    live_bytes: int
    workspace_bytes: int
    free_device: int
    free_host: int
    reason: str
    #: workers sharing the free host memory (and a CPU's), the free figures being one worker's share
    sharing: int = 1

    def describe(self) -> str:
        """One line for logs and the search display."""
        share = f" (a 1/{self.sharing} share per worker)" if self.sharing > 1 else ""
        return (f"placement {self.placement} on {self.device}: pool {_gb(self.pool_bytes)}, live model "
                f"{_gb(self.live_bytes)}, workspace {_gb(self.workspace_bytes)}; {_gb(self.free_device)} free on "
                f"the device, {_gb(self.free_host)} on the host{share} ({self.reason})")


def available_memory(device: str) -> tuple[int, int]:
    """(free device bytes, free host bytes) now."""
    host = _host_available()
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free), host
    return host, host


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not stand in the way


def plan_memory(pool_bytes: int, live_bytes: int, workspace_bytes: int, device: str, requested: str = "auto",
                free: tuple[int, int] | None = None, sharing: int = 1) -> MemoryPlan:
    """Choose a placement (``requested`` unless ``auto``) for a pool of ``pool_bytes`` on ``device``.

    ``free`` overrides the measured (device, host) free memory; ``sharing`` workers start together on
    this machine and split its host memory (a CPU's device memory too).
    """
    if requested not in PLACEMENTS:
        raise EvomergeError(f"placement {requested!r}: choose one of {', '.join(PLACEMENTS)}")
    free_device, free_host = free if free is not None else available_memory(device)
    cuda = device.startswith("cuda")
    sharing = max(1, sharing)
    free_host //= sharing
    if not cuda:
        free_device //= sharing
    resident_fits = live_bytes + workspace_bytes <= HEADROOM * free_device  # whatever the placement
    fits = {"device": pool_bytes + live_bytes + workspace_bytes <= HEADROOM * free_device,
            "host": resident_fits and pool_bytes <= HEADROOM * free_host,
            "disk": resident_fits}
    if requested == "host" and not cuda:
        requested, reason = "device", "host memory is the device memory of a cpu worker"
    else:
        reason = "as requested"
    if requested != "auto":
        placement = requested
        if not fits[placement]:
            reason += "; it needs more than the free memory, so expect to run out"
    elif fits["device"]:
        placement, reason = "device", "everything fits on the device"
    elif cuda and fits["host"]:
        placement, reason = "host", "the pool does not fit on the device next to the live model; it fits in host memory"
    elif fits["disk"]:
        placement, reason = "disk", "the pool fits neither on the device nor in host memory; read per candidate"
    else:
        raise EvomergeError(
            f"the live model ({_gb(live_bytes)}) and the merge workspace ({_gb(workspace_bytes)}) alone need more "
            f"than {HEADROOM:.0%} of the {_gb(free_device)} free on the {device}"
            + (f" (a 1/{sharing} share: {sharing} workers)" if sharing > 1 and not cuda else "")
            + "; free memory" + (", use fewer workers" if sharing > 1 else "") + " or use a larger device")
    return MemoryPlan(placement, device, pool_bytes, live_bytes, workspace_bytes, free_device, free_host, reason,
                      sharing)
