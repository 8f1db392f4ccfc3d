"""The machine a benchmark ran on, written beside every figure (shared by the benchmark scripts)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def machine() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "platform": platform.platform(), "device": "cpu"}


def choose_threads(requested: int | None) -> str:
    """Set torch's thread count: ``requested`` if given, else 1 when the machine is already busy
    (1-minute load average above cores - 0.5: a second OpenMP thread that keeps losing its core makes
    every parallel op wait, measured 25x slower decode steps on a shared 2-core box), else torch's own
    choice. Returns the reason, recorded with the results."""
    if requested:
        torch.set_num_threads(requested)
        return f"--threads {requested}"
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if cores > 1 and load > cores - 0.5:
        torch.set_num_threads(1)
        return f"auto: 1 (load average {load:.1f} on {cores} cores before the run)"
    return f"auto: torch default {torch.get_num_threads()} (load average {load:.1f} on {cores} cores)"
