"""What ``--device`` accepts: ``cpu``, ``cuda`` or ``cuda:N``, checked before any work starts."""

from __future__ import annotations

import re

from evomerge.errors import EvomergeError


def check_device(device: str) -> None:
    """Raise a one-line error for a device name torch would reject, or CUDA on a machine without it."""
    import torch

    if device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
        raise EvomergeError(f"--device {device!r}: use cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvomergeError(f"--device {device}: no CUDA device is available")
