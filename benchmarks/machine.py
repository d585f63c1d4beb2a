"""What a benchmark ran on: CPU, cores, memory, GPU and library versions (printed first)."""

from __future__ import annotations

import os
import platform
from importlib import metadata


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return float("nan")


def describe(libraries: tuple[str, ...] = ("numpy", "pydicom", "torch")) -> str:
    """One block of text naming the machine and the versions that matter."""
    lines = [
        f"machine: {_cpu_model()}, {len(os.sched_getaffinity(0))} usable cores, "
        f"{_memory_gib():.0f} GiB",
        f"python {platform.python_version()} on {platform.system()} {platform.release()}",
    ]
    versions = []
    for name in libraries:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} not installed")
    lines.append(", ".join(versions))
    try:
        import torch

        if torch.cuda.is_available():
            lines.append(f"gpu: {torch.cuda.get_device_name(0)}")
    except ImportError:
        pass
    return "\n".join(lines)
