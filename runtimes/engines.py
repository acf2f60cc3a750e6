"""Opening a single-engine bundle (ONNX Runtime or TensorRT): what `runtimes.load` does for every
bundle but the composite ones, and what a zero-shot bundle does for each of its towers."""

from __future__ import annotations

import os
from pathlib import Path

from .base import Runner
from .choices import Kind
from .errors import IncompatibleEngine, UsageError
from .manifest import Manifest, verify_files


def load_engine(bundle: str | os.PathLike[str], *, device: str | None = None, threads: int | None = None,
                verify: bool = True, cuda_graph: bool = False, trt_runtime: str = "auto",
                manifest: Manifest | None = None) -> Runner:
    """Read the manifest (unless given), check the files' sha256 (verify), and open the engine
    (runtimes.load's arguments and defaults)."""
    path = Path(bundle)
    manifest = manifest or Manifest.read(path)
    if manifest.kind in (Kind.GENERATION, Kind.VISION_LANGUAGE):  # prefill + decode engines, run by a loop
        raise UsageError(
            f"Expected a single-engine bundle for runtimes.load, found a generation bundle at '{path}' (prefill and "
            "decode engines with a KV cache). Run it with runtimes.generate.load_generator(bundle), or "
            f"`enginekit generate {path} --prompt TEXT`."
        )
    if verify:
        verify_files(path, manifest)
    return open_engine(path, manifest, device=device, threads=threads, cuda_graph=cuda_graph, trt_runtime=trt_runtime)


def open_engine(bundle: Path, manifest: Manifest, *, device: str | None = None, threads: int | None = None,
                cuda_graph: bool = False, trt_runtime: str = "auto") -> Runner:
    """The Runner of an ORT or TensorRT bundle whose manifest is already read. Backends are imported
    here, on first use."""
    backend = manifest.target.backend
    if backend == "trt":
        from .trt.runner import TrtRunner

        return TrtRunner(Path(bundle), manifest, device=device, cuda_graph=cuda_graph, runtime=trt_runtime)
    if backend == "ort":
        from .ort.runner import OrtRunner

        return OrtRunner(Path(bundle), manifest, device=device, threads=threads, cuda_graph=cuda_graph)
    raise IncompatibleEngine(
        f"Expected a bundle for backend 'ort' or 'trt', found '{backend}' in {bundle}. This enginekit "
        f"cannot run it; rebuild it with: {manifest.rebuild_command}"
    )
