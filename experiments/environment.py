"""What ran a measurement: package versions and the machine, recorded with every result."""
from __future__ import annotations

import os
import platform
from importlib import metadata


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "nvidia-modelopt", "optuna", "rouge-score", "tensorrt_llm"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count()}
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["ram_gb"] = round(pages * size / 2**30, 1)
    except (ValueError, OSError):
        pass
    import torch

    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info
