"""`enginekit doctor`: what this machine can build and run."""

from __future__ import annotations

import importlib.metadata as md
import platform
import sys
from typing import Any

from runtimes.device import gpu_info, supports

PACKAGES = ("enginekit", "torch", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "transformers", "polygraphy",
            "nvidia-modelopt", "tensorrt", "tensorrt-lean-cu13", "cuda-python", "numpy")


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def doctor_report() -> dict[str, Any]:
    gpu = gpu_info()
    cc = tuple(gpu["compute_capability"]) if gpu else None
    try:
        import onnxruntime as ort

        providers = list(ort.get_available_providers())
    except ImportError:
        providers = []
    try:
        import tensorrt  # noqa: F401

        trt_ok = True
    except ImportError:
        trt_ok = False
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in PACKAGES},
        "onnxruntime_providers": providers,
        "gpu": gpu,
        "precision_support": {
            "fp32": True,
            "fp16": True if gpu is None else cc >= (5, 3),  # type: ignore[operator]
            "bf16": supports("bf16", cc),
            "fp8": supports("fp8", cc),
            "int8": True,
        },
        "targets": {
            "ort-cpu": "CPUExecutionProvider" in providers,
            "ort-cuda": "CUDAExecutionProvider" in providers and gpu is not None,
            "trt": trt_ok and gpu is not None and supports("trt11", cc) if trt_ok else False,
        },
        "notes": _notes(gpu, providers, trt_ok),
    }


def _notes(gpu: dict[str, Any] | None, providers: list[str], trt_ok: bool) -> list[str]:
    notes = []
    if gpu is None:
        notes.append("No NVIDIA GPU answered (nvidia-smi): CPU engines only; BF16 and FP8 numerics cannot be run here.")
    else:
        cc = tuple(gpu["compute_capability"])
        if not supports("bf16", cc):
            notes.append(f"Compute capability {cc[0]}.{cc[1]} < 8.0: no BF16 tensor cores; --precision bf16 is refused.")
        if not supports("fp8", cc):
            notes.append(f"Compute capability {cc[0]}.{cc[1]} < 8.9: no FP8; --precision fp8 is refused.")
        if "CUDAExecutionProvider" not in providers:
            notes.append("A GPU is present but onnxruntime has no CUDA provider: pip install 'enginekit[gpu]'.")
    if not trt_ok:
        notes.append("TensorRT is not importable: --target trt needs pip install 'enginekit[trt]' on an NVIDIA machine.")
    return notes
