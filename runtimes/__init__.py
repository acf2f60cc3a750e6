"""The thin runtime: load an engine bundle and run it with numpy plus one backend.

    import runtimes
    with runtimes.load("engines/minilm-ort-fp32") as r:
        outputs = r.infer({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})

Importing or using this package never imports torch, transformers, `exporter` or `calibration`
(tests/runtimes/test_thin.py proves it in a subprocess). Backends are imported on first use.
"""

from __future__ import annotations

import os
from pathlib import Path

from ._version import __version__
from .base import Runner
from .engines import load_engine, open_engine
from .errors import (
    BuildError,
    DataError,
    EnginekitError,
    ExportError,
    IncompatibleEngine,
    InvalidInput,
    MissingDependency,
    ParityError,
    SourceError,
    UsageError,
)
from .manifest import ZERO_SHOT_BACKEND, DimRange, IOSpec, Manifest, Target, TensorSpec, verify_files

__all__ = [
    "BuildError", "DataError", "DimRange", "EnginekitError", "ExportError", "IOSpec", "IncompatibleEngine",
    "InvalidInput", "Manifest", "MissingDependency", "ParityError", "Runner", "SourceError", "Target",
    "TensorSpec", "UsageError", "__version__", "load", "open_runner",
]


def load(
    bundle: str | os.PathLike[str],
    *,
    device: str | None = None,
    threads: int | None = None,
    verify: bool = True,
    cuda_graph: bool = False,
    trt_runtime: str = "auto",
) -> Runner:
    """Open an engine bundle and return its Runner.

    device: None runs where the bundle was built for ('cpu' or 'cuda'); 'cpu' runs an ORT bundle
    built for CUDA on the CPU provider instead. threads: intra-op threads for CPU (default: ORT's
    choice, one per core). verify: check every file's sha256 against the manifest (default True).
    cuda_graph: replay a captured CUDA graph per input shape (ORT CUDA and TensorRT bundles;
    default False). trt_runtime: 'auto' (tensorrt, else tensorrt_lean for version-compatible plans),
    'full' or 'lean'. Raises IncompatibleEngine, with the command that rebuilds it, for a bundle
    this machine cannot run.
    """
    path = Path(bundle)
    manifest = Manifest.read(path)
    if manifest.target.backend != ZERO_SHOT_BACKEND:
        return load_engine(path, device=device, threads=threads, verify=verify, cuda_graph=cuda_graph,
                           trt_runtime=trt_runtime, manifest=manifest)
    if verify:
        verify_files(path, manifest)
    return open_runner(path, manifest, device=device, threads=threads, cuda_graph=cuda_graph, trt_runtime=trt_runtime)


def open_runner(bundle: Path, manifest: Manifest, *, device: str | None = None, threads: int | None = None,
                cuda_graph: bool = False, trt_runtime: str = "auto") -> Runner:
    """The Runner for an already-read manifest (the build's gate uses it on the staging bundle before
    the manifest is written): a zero-shot bundle's two towers (runtimes/zeroshot.py), else its engine."""
    if manifest.target.backend == ZERO_SHOT_BACKEND:  # a CLIP bundle: one engine bundle per tower inside
        from .zeroshot import ZeroShotRunner

        return ZeroShotRunner(Path(bundle), manifest, device=device, threads=threads, cuda_graph=cuda_graph,
                              trt_runtime=trt_runtime)
    return open_engine(Path(bundle), manifest, device=device, threads=threads, cuda_graph=cuda_graph,
                       trt_runtime=trt_runtime)
