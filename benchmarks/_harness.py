"""Shared helpers for benchmark scripts: timed child processes, mergekit discovery."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Run:
    """Wall time and peak resident memory of one child process."""

    seconds: float
    peak_rss_mb: float
    returncode: int
    stderr: str


def timed(cmd: list[str], env: dict | None = None) -> Run:
    """Run ``cmd`` and return its wall time and peak RSS (from ``wait4``'s rusage)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    stderr = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Run(time.perf_counter() - start, usage.ru_maxrss / 1024, proc.returncode, stderr[-2000:])


def evomerge_cmd() -> list[str]:
    """How to call this checkout's CLI."""
    return [sys.executable, "-m", "evomerge.cli"]


def find_mergekit(venv: str | None) -> str | None:
    """Path of ``mergekit-yaml``: in ``venv`` if given, else on PATH."""
    if venv:
        candidate = Path(venv) / "bin" / "mergekit-yaml"
        return str(candidate) if candidate.exists() else None
    return shutil.which("mergekit-yaml")
