"""What accelerator this machine has, without torch: nvidia-smi, which ships with the driver."""

from __future__ import annotations

import functools
import shutil
import subprocess
from typing import Any

# Compute capability thresholds, from NVIDIA's documentation: BF16 tensor cores from Ampere (8.0),
# FP8 from Ada/Hopper (8.9), TensorRT 11 needs Turing (7.5) or newer.
BF16_MIN_CC = (8, 0)
FP8_MIN_CC = (8, 9)
TRT11_MIN_CC = (7, 5)


@functools.lru_cache(maxsize=1)
def gpu_info() -> dict[str, Any] | None:
    """Name, compute capability, memory and driver of GPU 0, or None when no NVIDIA GPU answers."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,compute_cap,memory.total,driver_version", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line for line in out.splitlines() if line.strip()]
    if not lines:
        return None
    name, cc, mem, driver = (part.strip() for part in lines[0].split(",")[:4])
    major, _, minor = cc.partition(".")
    return {
        "name": name,
        "compute_capability": [int(major), int(minor or 0)],
        "memory_mib": int(float(mem)) if mem.replace(".", "").isdigit() else None,
        "driver": driver,
        "count": len(lines),
    }


def supports(feature: str, cc: tuple[int, int] | list[int] | None) -> bool:
    """Whether compute capability `cc` supports 'bf16', 'fp8' or 'trt11'."""
    if cc is None:
        return False
    need = {"bf16": BF16_MIN_CC, "fp8": FP8_MIN_CC, "trt11": TRT11_MIN_CC}[feature]
    return tuple(cc) >= need
