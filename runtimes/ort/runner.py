"""Run an ONNX Runtime bundle: CPU provider, or CUDA provider through IO binding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .._deps import require
from ..base import Runner
from ..errors import IncompatibleEngine
from ..manifest import Manifest
from .build import PROVIDERS


def _major(version: str) -> str:
    return version.split(".")[0]


class OrtRunner(Runner):
    """An `onnxruntime.InferenceSession` over the bundle's model.onnx.

    device: None → the bundle's device; 'cpu' may run a CUDA bundle on the CPU provider.
    threads: intra-op threads (None: ORT's default, one per physical core).
    """

    def __init__(self, bundle: Path, manifest: Manifest, *, device: str | None = None, threads: int | None = None):
        super().__init__(bundle, manifest)
        ort = require("onnxruntime", extra="cpu", purpose="Running an ONNX Runtime engine")
        built_with = str(manifest.target.versions.get("onnxruntime", ""))
        if built_with and _major(built_with) != _major(ort.__version__):
            raise IncompatibleEngine(
                f"Expected ONNX Runtime {_major(built_with)}.x (bundle '{manifest.name}' was built with "
                f"{built_with}), found {ort.__version__}. Install a matching onnxruntime, or rebuild the "
                f"bundle here: {manifest.rebuild_command}"
            )
        self.device = device or manifest.target.device
        if self.device not in PROVIDERS:
            raise IncompatibleEngine(f"Expected device 'cpu' or 'cuda', found '{self.device}'.")
        provider = PROVIDERS[self.device]
        available = ort.get_available_providers()
        if provider not in available:
            raise IncompatibleEngine(
                f"Expected ONNX Runtime's {provider} for bundle '{manifest.name}' (device '{self.device}'), "
                f"but this onnxruntime {ort.__version__} offers only {available}. For CUDA install "
                "onnxruntime-gpu (pip install 'enginekit[gpu]') on a machine with an NVIDIA GPU and its "
                "driver; or run it on the CPU with runtimes.load(bundle, device='cpu'); or rebuild it: "
                f"{manifest.rebuild_command}"
            )
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = int(threads)
        providers: list[Any] = [provider] + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [])
        model = self.bundle / manifest.target.engine_files[0]
        try:
            self.session = ort.InferenceSession(str(model), so, providers=providers)
        except Exception as exc:  # ORT's pybind exception types
            raise IncompatibleEngine(
                f"Expected ONNX Runtime {ort.__version__} to open {model}, but it failed: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}. "
                f"Rebuild the bundle with this ONNX Runtime: {manifest.rebuild_command}"
            ) from None
        graph_inputs = {i.name for i in self.session.get_inputs()}
        declared = {s.name for s in manifest.io.inputs}
        if graph_inputs != declared:
            raise IncompatibleEngine(
                f"Expected the engine's inputs {sorted(declared)} (from the manifest), found "
                f"{sorted(graph_inputs)} in {model}. The bundle is inconsistent; rebuild it: "
                f"{manifest.rebuild_command}"
            )
        self.threads = threads
        self._output_names = [s.name for s in manifest.io.outputs]

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.device == "cpu":
            outs = self.session.run(self._output_names, feeds)
            return dict(zip(self._output_names, outs))
        # CUDA: IO binding copies inputs once and lets ORT allocate outputs on the device; the
        # device-resident, CUDA-graph path for benchmarks and serving builds on this.
        binding = self.session.io_binding()
        for name, arr in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(arr))
        for name in self._output_names:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        return dict(zip(self._output_names, binding.copy_outputs_to_cpu()))

    def close(self) -> None:
        self.session = None
