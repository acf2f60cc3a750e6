"""`enginekit doctor`: what this machine can build and run."""

from __future__ import annotations

import importlib.metadata as md
import platform
import sys
from typing import Any

from runtimes.device import gpu_info, supports

PACKAGES = ("enginekit", "torch", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "transformers", "polygraphy",
            "nvidia-modelopt", "tensorrt", "tensorrt-lean-cu13", "cuda-python", "cuda-bindings", "numpy")
# TensorRT's wheels have several distribution names (tensorrt, tensorrt-cu12, tensorrt-cu13, ...):
# what matters is which modules import.
TRT_MODULES = ("tensorrt", "tensorrt_lean", "cuda.bindings")


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
    from runtimes._deps import version_of
    from runtimes.trt.build import tensorrt_unavailable

    modules = {m: version_of(m) for m in TRT_MODULES}
    trt_ok = modules["tensorrt"] is not None
    trt_build = trt_ok and gpu is not None and tensorrt_unavailable() is None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in PACKAGES},
        "tensorrt_modules": modules,
        "import_packages": _import_packages(),
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
            "trt": bool(trt_build),
            # the lean runtime runs plans built --version-compatible; it cannot build any
            "trt-lean-run": modules["tensorrt_lean"] is not None and modules["cuda.bindings"] is not None
            and gpu is not None,
        },
        "notes": _notes(gpu, providers, trt_ok) + _trt_notes(modules, cc) + _clash_notes(),
    }


def _import_packages() -> dict[str, list[str]]:
    """Which installed distributions provide enginekit's import packages. PyPI has unrelated projects
    named `exporter` and `runtimes`; installed beside enginekit they would overwrite its files."""
    owners = md.packages_distributions()
    return {name: sorted(set(owners.get(name, []))) for name in ("exporter", "calibration", "runtimes")}


def _clash_notes() -> list[str]:
    notes = []
    for name, dists in _import_packages().items():
        others = [d for d in dists if d.lower() != "enginekit"]
        if others:
            notes.append(f"The import package '{name}' is also provided by {', '.join(others)} here, which overwrites "
                         f"enginekit's files: uninstall {others[0]} or install enginekit into its own venv.")
    return notes


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
        notes.append("TensorRT is not importable: --target trt needs pip install 'enginekit[trt]' on an NVIDIA machine; "
                     "without it, build --target trt stops after lowering and keeps the ONNX to finish elsewhere.")
    return notes


def _trt_notes(modules: dict[str, str | None], cc: tuple[int, ...] | None) -> list[str]:
    notes = []
    if modules["tensorrt"] is None and modules["tensorrt_lean"] is not None:
        notes.append("Only the TensorRT lean runtime is here: it runs plans built with --version-compatible, and "
                     "builds nothing.")
    if (modules["tensorrt"] or modules["tensorrt_lean"]) and modules["cuda.bindings"] is None:
        notes.append("TensorRT is here but cuda-bindings is not: the TensorRT runner needs it (pip install cuda-bindings).")
    major = (modules["tensorrt"] or "0").split(".")[0]
    if cc is not None and major.isdigit() and int(major) >= 11 and not supports("trt11", cc):
        notes.append(f"TensorRT {major} needs compute capability ≥ 7.5; this GPU has {cc[0]}.{cc[1]}.")
    return notes
