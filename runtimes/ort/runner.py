"""Run an ONNX Runtime bundle: the CPU provider, or the CUDA provider through IO binding.

CUDA path (what `enginekit bench` and `enginekit serve` run):
- inputs and outputs live in device buffers preallocated per input shape and bound once
  (IO binding); `infer` copies inputs into them and results out, `run_prepared` runs on what is
  already on the device (a benchmark's device-resident case);
- `cuda_graph=True` replays a captured CUDA graph per input shape. ORT captures only when every
  node runs on the GPU, and a dynamic-shape graph keeps shape arithmetic on the CPU, so each
  shape gets its own session with ORT's free-dimension overrides (the dims become constants and
  the shape subgraph folds away). Sessions per shape cost device memory: at most `max_graphs`.
- provider options: the bundle's measured choice (manifest target.options.cuda_provider_options,
  e.g. cuDNN algorithm search, NHWC for conv nets) plus TF32 off for FP32 bundles, so an FP32
  engine computes FP32 as its gate assumed.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .._deps import require
from ..base import Runner
from ..errors import IncompatibleEngine, InvalidInput, UsageError
from ..manifest import Manifest
from .build import PROVIDERS


class _NeverRaised(Exception):
    """Stands in for ORT's InvalidArgument where an onnxruntime build lacks it."""


def _major(version: str) -> str:
    return version.split(".")[0]


class _Slot:
    """Device buffers for one set of input shapes, bound once to an IO binding."""

    def __init__(self, ort: Any, session: Any, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, np.dtype],
                 outputs: list[str], graph_run_options: Any | None):
        self.session = session
        self.binding = session.io_binding()
        self.inputs = {n: ort.OrtValue.ortvalue_from_shape_and_type(shapes[n], dtypes[n], "cuda", 0) for n in shapes}
        for n, v in self.inputs.items():
            self.binding.bind_ortvalue_input(n, v)
        self.outputs = outputs
        self.run_options = graph_run_options
        self.bound_outputs = False
        self.ort = ort

    def load(self, feeds: dict[str, np.ndarray]) -> None:
        for n, arr in feeds.items():
            self.inputs[n].update_inplace(np.ascontiguousarray(arr))

    def run(self) -> None:
        if not self.bound_outputs:
            # First run: ORT allocates the outputs on the device; keep and rebind those very
            # buffers so later runs (and a captured CUDA graph) write to fixed addresses.
            for n in self.outputs:
                self.binding.bind_output(n, "cuda")
            self.session.run_with_iobinding(self.binding, self.run_options)
            values = self.binding.get_outputs()
            self.binding.clear_binding_outputs()
            for n, v in zip(self.outputs, values):
                self.binding.bind_ortvalue_output(n, v)
            self.out_values = values
            self.bound_outputs = True
            if self.run_options is None:
                return
        self.session.run_with_iobinding(self.binding, self.run_options)

    def fetch(self) -> dict[str, np.ndarray]:
        return {n: v.numpy() for n, v in zip(self.outputs, self.out_values)}


class _CpuSlot:
    """The same prepare/run/fetch shape on the CPU provider (inputs are host arrays already)."""

    def __init__(self, session: Any, outputs: list[str]):
        self.session, self.outputs = session, outputs
        self.feeds: dict[str, np.ndarray] = {}
        self.values: list[np.ndarray] = []

    def load(self, feeds: dict[str, np.ndarray]) -> None:
        self.feeds = feeds

    def run(self) -> None:
        self.values = self.session.run(self.outputs, self.feeds)

    def fetch(self) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.values))


def ort_log_level() -> int:
    """ONNX Runtime's log severity for its sessions: ENGINEKIT_ORT_LOG_LEVEL (0 verbose .. 4 fatal; `enginekit -v`
    sets 2), default 4. Its log lines go straight to stderr, past Python's logging, and every error it would
    print (a refused input, say: one red line per bad request in a server log) also comes back as an
    exception that the runner turns into InvalidInput or IncompatibleEngine, so by default only fatal ones print."""
    value = os.environ.get("ENGINEKIT_ORT_LOG_LEVEL", "4").strip()
    return int(value) if value in ("0", "1", "2", "3", "4") else 4


def capture_blockers(manifest: Manifest) -> list[str]:
    """The ops that keep an engine from CUDA graph replay: those the build found whose output sizes depend on the
    data (runtimes/ort/build.py data_dependent_ops); [] when it can be captured."""
    return list(manifest.target.options.get("data_dependent_ops") or [])


def _check_capturable(manifest: Manifest) -> None:
    """Refuse cuda_graph=True for an engine with capture_blockers."""
    found = capture_blockers(manifest)
    if found:
        raise UsageError(
            f"Expected an engine whose every output size is known before it runs for cuda_graph=True, found "
            f"{', '.join(found)} in bundle '{manifest.name}': their output sizes depend on the data, which a CUDA graph "
            "cannot capture. Run it without CUDA graphs (drop cuda_graph, or --no-cuda-graph), or export the raw "
            "outputs (--detector-outputs raw) and run NMS outside the graph."
        )


class OrtRunner(Runner):
    """An `onnxruntime.InferenceSession` over the bundle's model.onnx.

    device: None → the bundle's device; 'cpu' may run a CUDA bundle on the CPU provider.
    threads: intra-op threads (None: ORT's default, one per physical core).
    cuda_graph: replay a captured CUDA graph per input shape (CUDA only).
    provider_options: extra CUDA provider options, over the bundle's recorded ones.
    graph_session: open `session` itself with enable_cuda_graph, for a caller that binds fixed buffers and names
    each run's gpu_graph_id (runtimes/onegraph.py); not for infer() (a run without a gpu_graph_id is captured).
    """

    def __init__(self, bundle: Path, manifest: Manifest, *, device: str | None = None, threads: int | None = None,
                 cuda_graph: bool = False, provider_options: dict[str, Any] | None = None, max_graphs: int = 4,
                 graph_session: bool = False):
        super().__init__(bundle, manifest)
        ort = require("onnxruntime", extra="cpu", purpose="Running an ONNX Runtime engine")
        # ORT's process-wide logger (its start-up warnings, e.g. 1.31's "No registered plugin EP device"): errors only
        ort.set_default_logger_severity(min(ort_log_level(), 3))
        self.ort = ort
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
        if cuda_graph and self.device != "cuda":
            raise UsageError(
                f"Expected cuda_graph=True only for a bundle that runs on CUDA, found device '{self.device}' for "
                f"bundle '{manifest.name}'. Drop cuda_graph (or --no-cuda-graph), or run a bundle built with "
                "--device cuda on a GPU."
            )
        self.threads = threads
        self.cuda_graph = bool(cuda_graph)
        self.max_graphs = max_graphs
        self.cuda_options: dict[str, Any] = {}
        if self.device == "cuda":
            self.cuda_options = {"device_id": 0}
            if manifest.precision.get("requested", "fp32") == "fp32":
                self.cuda_options["use_tf32"] = 0
            self.cuda_options.update(manifest.target.options.get("cuda_provider_options", {}))
            self.cuda_options.update(provider_options or {})
        self.model_path = manifest.file(self.bundle, manifest.target.engine_files[0], "engine file")
        if self.cuda_graph:
            _check_capturable(manifest)
        self.session = self._session(graph=graph_session)
        graph_inputs = {i.name for i in self.session.get_inputs()}
        declared = {s.name for s in manifest.io.inputs}
        if graph_inputs != declared:
            raise IncompatibleEngine(
                f"Expected the engine's inputs {sorted(declared)} (from the manifest), found "
                f"{sorted(graph_inputs)} in {self.model_path}. The bundle is inconsistent; rebuild it: "
                f"{manifest.rebuild_command}"
            )
        # ORT's exception for argument values it refuses (status INVALID_ARGUMENT)
        self._invalid_argument: type[Exception] = getattr(
            getattr(ort.capi, "onnxruntime_pybind11_state", None), "InvalidArgument", _NeverRaised)
        self._output_names = [s.name for s in manifest.io.outputs]
        self._dtypes = {s.name: np.dtype(s.dtype) for s in manifest.io.inputs if s.dtype != "bfloat16"}
        self._slots: OrderedDict[tuple[Any, ...], _Slot] = OrderedDict()

    def _session(self, dims: dict[str, int] | None = None, graph: bool = False) -> Any:
        ort = self.ort
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = ort_log_level()
        if self.threads:
            so.intra_op_num_threads = int(self.threads)
        for name, size in (dims or {}).items():
            so.add_free_dimension_override_by_name(name, int(size))
        if self.device == "cuda":
            options = dict(self.cuda_options, **({"enable_cuda_graph": 1} if graph else {}))
            providers: list[Any] = [(PROVIDERS["cuda"], {k: str(v) for k, v in options.items()}), PROVIDERS["cpu"]]
        else:
            providers = [PROVIDERS["cpu"]]
        try:
            return ort.InferenceSession(str(self.model_path), so, providers=providers)
        except Exception as exc:  # ORT's pybind exception types
            raise IncompatibleEngine(
                f"Expected ONNX Runtime {ort.__version__} to open {self.model_path}"
                f"{(' for CUDA graph capture' + (f' at {dims}' if dims else '')) if graph else ''}, but it failed: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}. "
                f"Rebuild the bundle with this ONNX Runtime: {self.manifest.rebuild_command}"
            ) from None

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    # -- device-resident execution (CUDA) -------------------------------------------------------------
    def _slot(self, feeds: dict[str, np.ndarray]) -> _Slot:
        shapes = {n: tuple(np.shape(a)) for n, a in feeds.items()}
        key = tuple(sorted(shapes.items()))
        slot = self._slots.get(key)
        if slot is not None:
            self._slots.move_to_end(key)
            return slot
        session, run_options = self.session, None
        if self.cuda_graph:
            dims = {d: size for s in self.manifest.io.inputs for d, size in zip(s.shape, shapes[s.name]) if isinstance(d, str)}
            session = self._session(dims, graph=True)
            run_options = self.ort.RunOptions()
        dtypes = {n: self._dtypes.get(n, np.asarray(feeds[n]).dtype) for n in feeds}
        slot = _Slot(self.ort, session, shapes, dtypes, self._output_names, run_options)
        self._slots[key] = slot
        while len(self._slots) > (self.max_graphs if self.cuda_graph else 16):
            self._slots.popitem(last=False)
        return slot

    def prepare(self, feeds: Mapping[str, Any]) -> _Slot | _CpuSlot:
        """Validate `feeds` and place them where the engine reads them (device buffers on CUDA);
        then run_prepared() runs without host transfers, and slot.fetch() returns the outputs."""
        arrays = self.validate(feeds)
        slot: _Slot | _CpuSlot = self._slot(arrays) if self.device == "cuda" else _CpuSlot(self.session, self._output_names)
        slot.load(arrays)
        return slot

    def run_prepared(self, slot: _Slot | _CpuSlot) -> None:
        """One inference on prepared inputs; on CUDA the outputs stay on the device."""
        slot.run()

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return self._run(feeds)
        except self._invalid_argument as exc:
            # Names, dtypes and shapes were validated; what ORT still refuses is the values, e.g. a
            # Gather index (token id) beyond the embedding table. That is the caller's to fix.
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InvalidInput(
                f"Expected input values engine '{self.manifest.name}' accepts, but ONNX Runtime refused them: "
                f"{first[:400]}. Check the values' ranges (e.g. token ids below the vocabulary size)."
            ) from None

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.device == "cpu":
            outs = self.session.run(self._output_names, feeds)
            return dict(zip(self._output_names, outs))
        slot = self._slot(feeds)
        slot.load(feeds)
        slot.run()
        return slot.fetch()

    def close(self) -> None:
        self._slots.clear()
        self.session = None
