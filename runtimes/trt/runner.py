"""Run a TensorRT bundle: numpy in, numpy out, with `tensorrt` or `tensorrt_lean` and cuda-bindings.

No torch and no polygraphy: polygraphy's runner imports the full `tensorrt` (so it cannot run on
a lean-runtime-only machine), brings its own ctypes CUDA wrapper, and has no CUDA graphs; the raw
API needed here is a couple of dozen calls (RUNTIME_API lists them; bench/gpu/trt_lean_check.py
checks them against the real lean module on a GPU).

One inference: validated inputs are copied into device buffers sized for the profile's max
shapes, input shapes are set, execute_async_v3 runs on a private non-blocking stream, outputs are
copied back. With cuda_graph=True, calls with the same input shapes as the call before replay a
CUDA graph of the engine's work, captured after the first of them ran plainly; a call with other
shapes runs plainly and captures anew. One graph per runner, because a graph bakes in the
execution context's state for its shapes (NVIDIA: re-capture when shapes or state change), and
the context is shared. A runner is not thread-safe: give each thread its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..base import Runner
from ..errors import IncompatibleEngine, InvalidInput, MissingDependency
from ..manifest import Manifest
from .compat import PlanInfo, compatibility_problems
from .cuda import CudaError, DeviceBuffer, Graph, Stream, device_info

if TYPE_CHECKING:
    import tensorrt as trt_types

RUNTIMES = ("auto", "full", "lean")
MODULES = {"full": ("tensorrt",), "lean": ("tensorrt_lean",)}
# TensorRT DataType member name → numpy dtype name. BF16 has no numpy type: its outputs are
# widened to float32 (exactly), its inputs are taken as raw 2-byte values (e.g. ml_dtypes.bfloat16).
DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "UINT8": "uint8",
          "INT32": "int32", "INT64": "int64", "BOOL": "bool"}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1, "int32": 4, "int64": 8, "bool": 1}
# Every TensorRT attribute this module touches, by owner. tests/runtimes/test_trt_runner.py checks
# that the code uses nothing else; the GPU check script checks each exists in tensorrt_lean.
RUNTIME_API = {
    "module": ["Runtime", "ILogger", "TensorIOMode", "__version__"],
    "ILogger": ["Severity"],
    "Runtime": ["deserialize_cuda_engine", "engine_host_code_allowed"],
    "ICudaEngine": ["num_io_tensors", "get_tensor_name", "get_tensor_mode", "get_tensor_dtype", "get_tensor_shape",
                    "get_tensor_profile_shape", "is_shape_inference_io", "create_execution_context"],
    "IExecutionContext": ["set_input_shape", "infer_shapes", "get_tensor_shape", "set_tensor_address",
                          "execute_async_v3"],
}
# Used only through the full `tensorrt` module (not checked against the lean one).
FULL_ONLY_API = {"Runtime": ["load_runtime"]}


def import_runtime(name: str) -> Any:
    """Import `tensorrt` or `tensorrt_lean`; ImportError or OSError when it (or a library) is missing."""
    if name == "tensorrt":
        import tensorrt

        return tensorrt
    import tensorrt_lean

    return tensorrt_lean


def lean_library(major: int) -> str:
    """The lean runtime library for `load_runtime`: from the tensorrt_lean_libs wheel when it is
    installed, else the bare name, which the dynamic loader looks up on its search path."""
    name = f"libnvinfer_lean.so.{major}"
    try:
        import tensorrt_lean_libs

        candidate = Path(tensorrt_lean_libs.__file__).parent / name
        if candidate.is_file():
            return str(candidate)
    except (ImportError, OSError):
        pass
    return name


def open_runtime(trt: Any, module_name: str, logger: Any, plan: PlanInfo) -> tuple[Any, Any]:
    """(runtime, owner): a Runtime of `trt` ready to deserialize `plan`, and the object to keep
    alive while it is used. The runtime may load the host code that version-compatible plans
    carry; for a plan without the lean runtime opened through the full module, it is the lean
    runtime library loaded by the full one (NVIDIA's documented route), or None when that library
    cannot be loaded."""
    owner: trt_types.Runtime = trt.Runtime(logger)
    runtime = owner
    if plan.exclude_lean_runtime and module_name == "tensorrt":
        loaded: trt_types.Runtime | None = owner.load_runtime(lean_library(int(str(trt.__version__).split(".")[0])))
        if loaded is None:
            return None, owner
        runtime = loaded
    if plan.version_compatible:
        # Version-compatible plans carry host code (the lean runtime, plugins) that TensorRT
        # refuses to load unless allowed: this runs code from the bundle, whose sha256
        # runtimes.load() has checked against the manifest. Load only bundles you trust.
        runtime.engine_host_code_allowed = True
    return runtime, owner


def make_logger(trt: Any) -> Any:
    """A TensorRT logger that keeps warnings and errors, to quote them when a plan is refused."""

    class CollectingLogger(trt.ILogger):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)  # pybind11 trampolines need the base initialised explicitly
            self.messages: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) <= int(trt.ILogger.Severity.WARNING):  # 0 internal error .. 4 verbose
                self.messages.append(str(msg).strip())

    return CollectingLogger()


def dims(d: Any) -> tuple[int, ...]:
    """A TensorRT Dims as a tuple (the stubs give Dims no __iter__)."""
    return tuple(int(d[i]) for i in range(len(d)))


def widen_bf16(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) → float32, exactly: bf16 is the top half of a float32."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


class TrtRunner(Runner):
    """A TensorRT execution context over the bundle's model.plan.

    device: None or 'cuda' (a plan runs only on an NVIDIA GPU). cuda_graph: replay a captured CUDA
    graph while the input shapes stay the same (default False). runtime: 'auto' (tensorrt, or
    tensorrt_lean for version-compatible plans), 'full' or 'lean'.
    """

    def __init__(self, bundle: Path, manifest: Manifest, *, device: str | None = None, cuda_graph: bool = False,
                 runtime: str = "auto"):
        super().__init__(bundle, manifest)
        self._graph: tuple[tuple[tuple[int, ...], ...], Graph] | None = None  # (input shapes, graph)
        self._buffers: dict[str, DeviceBuffer] = {}
        self.stream: Stream | None = None
        if device not in (None, "cuda"):
            raise IncompatibleEngine(
                f"Expected device 'cuda' for TensorRT bundle '{manifest.name}', found '{device}': a TensorRT plan "
                f"runs only on an NVIDIA GPU. For the CPU build an ONNX Runtime bundle: "
                f"{manifest.rebuild_command.replace('--target trt', '--target ort --device cpu')}"
            )
        if runtime not in RUNTIMES:
            raise IncompatibleEngine(f"Expected runtime 'auto', 'full' or 'lean', found '{runtime}'.")
        self.plan_info = plan = PlanInfo.from_target(manifest.target)
        modules = self._import_candidates(MODULES.get(runtime, plan.runtime_candidates()))
        try:
            gpu = device_info()
        except CudaError as exc:
            raise IncompatibleEngine(
                f"Expected an NVIDIA GPU with a working driver to run TensorRT bundle '{manifest.name}', but CUDA "
                f"reports: {exc}. Run it on a machine with an NVIDIA GPU and driver, or build an ONNX Runtime "
                "bundle for the CPU (--target ort --device cpu)."
            ) from None
        self.gpu = gpu
        self.cuda_graph = bool(cuda_graph)
        self.cuda_graph_error: str | None = None
        engine = self._deserialize(plan, modules, (int(gpu["compute_capability"][0]), int(gpu["compute_capability"][1])))
        self.engine: trt_types.ICudaEngine = engine
        self._setup_io()
        context = engine.create_execution_context()
        if context is None:
            raise CudaError("create_execution_context returned nothing (out of GPU memory?)")
        self.context: trt_types.IExecutionContext = context
        self.stream = Stream()
        self._allocate_for_max_shapes()

    # -- opening -------------------------------------------------------------------------------------
    def _import_candidates(self, names: tuple[str, ...]) -> list[tuple[str, Any]]:
        """The candidate modules that import here, best first; MissingDependency when none does."""
        found, failures = [], []
        for name in names:
            try:
                found.append((name, import_runtime(name)))
            except (ImportError, OSError) as exc:
                failures.append(f"{name}: {exc}")
        if found:
            return found
        wanted = " or ".join(f"'{n}'" for n in names)
        if len(names) > 1:
            wanted += " (the plan is version-compatible, so the lean runtime can run it)"
        extra = "trt-lean" if names == ("tensorrt_lean",) else "trt"
        raise MissingDependency(
            f"Running TensorRT bundle '{self.manifest.name}' needs the Python module {wanted}, which cannot be "
            f"imported here ({'; '.join(failures)}). Install TensorRT {self.plan_info.tensorrt} with: pip install "
            f"'enginekit[{extra}]' (on a Linux machine with an NVIDIA GPU and driver), then run it again."
        )

    def _deserialize(self, plan: PlanInfo, modules: list[tuple[str, Any]], cc: tuple[int, int]) -> Any:
        """Deserialize the plan with the first module that fits this machine and succeeds."""
        blob = self.manifest.file(self.bundle, self.manifest.target.engine_files[0], "engine file").read_bytes()
        tried: list[str] = []
        for module_name, trt in modules:
            problems = compatibility_problems(plan, module_name, trt.__version__, cc)
            if problems:
                tried.append(f"{module_name} {trt.__version__}: {'; '.join(problems)}")
                continue
            logger = make_logger(trt)
            runtime, owner = open_runtime(trt, module_name, logger, plan)
            if runtime is None:
                tried.append(f"{module_name} {trt.__version__} could not load the lean runtime library the plan needs "
                             f"({lean_library(int(str(trt.__version__).split('.')[0]))}; pip install 'enginekit[trt-lean]')")
                continue
            engine = runtime.deserialize_cuda_engine(blob)
            if engine is not None:
                self.module_name, self.tensorrt_version = module_name, str(trt.__version__)
                # the engine needs its runtime (and the runtime its owner and logger) alive
                self._trt, self._logger, self._runtime, self._owner = trt, logger, runtime, owner
                return engine
            log = " | ".join(logger.messages[-3:]) or "no message"
            tried.append(f"{module_name} {trt.__version__} could not deserialize it (TensorRT: {log})")
        raise IncompatibleEngine(
            f"Expected a TensorRT runtime that can run bundle '{self.manifest.name}' (built with {plan.describe()}), "
            f"but on this machine ({self.gpu['name']}, compute capability {cc[0]}.{cc[1]}): {'; '.join(tried)}. "
            f"Rebuild the bundle here: {self.manifest.rebuild_command} (add --version-compatible or --hardware-compat "
            "ampere+ for a plan that runs on other TensorRT versions or GPUs)."
        )

    def _setup_io(self) -> None:
        engine, trt = self.engine, self._trt
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        specs = {s.name: s for s in [*self.manifest.io.inputs, *self.manifest.io.outputs]}
        problems = []
        # TensorRT may drop a graph input that no output depends on; the manifest keeps it, so
        # validation still asks for it, and it is simply not uploaded.
        extra_inputs = [n for n in self._inputs if n not in specs]
        if extra_inputs:
            problems.append(f"inputs {extra_inputs} are not in the manifest")
        if sorted(self._outputs) != sorted(s.name for s in self.manifest.io.outputs):
            problems.append(f"outputs {sorted(self._outputs)} differ from the manifest's "
                            f"{sorted(s.name for s in self.manifest.io.outputs)}")
        self._dtypes: dict[str, str] = {}
        for n in names:
            dtype = DTYPES.get(engine.get_tensor_dtype(n).name)
            if dtype is None:
                problems.append(f"'{n}' has TensorRT type {engine.get_tensor_dtype(n).name}, which this runner cannot "
                                "exchange with numpy")
            elif n in specs and dtype != specs[n].dtype:
                problems.append(f"'{n}' is {dtype} in the plan but {specs[n].dtype} in the manifest")
            if engine.is_shape_inference_io(n):
                problems.append(f"'{n}' is a shape tensor, which this runner does not support")
            self._dtypes[n] = dtype or "?"
        if problems:
            raise IncompatibleEngine(
                f"Expected the plan of bundle '{self.manifest.name}' to have the inputs and outputs its manifest "
                f"records, but {'; '.join(problems)}. Rebuild it: {self.manifest.rebuild_command}"
            )

    def _allocate_for_max_shapes(self) -> None:
        """Size every buffer for the profile's max shapes once, so later calls reuse the same
        addresses (which captured CUDA graphs depend on)."""
        shapes = {}
        for n in self._inputs:
            static = dims(self.engine.get_tensor_shape(n))
            shapes[n] = dims(self.engine.get_tensor_profile_shape(n, 0)[2]) if -1 in static else static
        out_shapes = self._set_shapes(shapes)
        for n, shape in {**shapes, **out_shapes}.items():
            self._ensure(n, shape)

    # -- running -------------------------------------------------------------------------------------
    def _set_shapes(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        for n, shape in shapes.items():
            if not self.context.set_input_shape(n, shape):
                raise IncompatibleEngine(f"TensorRT refused shape {list(shape)} for input '{n}' of "
                                         f"'{self.manifest.name}': {' | '.join(self._logger.messages[-2:])}")
        unresolved = self.context.infer_shapes()
        if unresolved:
            raise IncompatibleEngine(f"TensorRT could not infer the shapes of {unresolved} in '{self.manifest.name}'.")
        out = {n: dims(self.context.get_tensor_shape(n)) for n in self._outputs}
        dynamic = [n for n, s in out.items() if -1 in s]
        if dynamic:
            raise IncompatibleEngine(
                f"Expected output shapes that follow from the input shapes, but {dynamic} of '{self.manifest.name}' "
                "depend on the data (e.g. NonZero); this runner does not support such outputs. Use --target ort."
            )
        return out

    def _ensure(self, name: str, shape: tuple[int, ...]) -> bool:
        """Make the buffer of `name` hold `shape`; True when it had to move (graphs are then stale)."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[self._dtypes[name]]
        buf = self._buffers.get(name)
        if buf is not None and buf.nbytes >= nbytes:
            return False
        if buf is not None:
            buf.free()
        self._buffers[name] = DeviceBuffer(nbytes)
        self.context.set_tensor_address(name, self._buffers[name].ptr)
        return True

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        stream = self._live_stream()
        inputs = {n: np.ascontiguousarray(feeds[n]) for n in self._inputs}
        out_shapes = self._set_shapes({n: a.shape for n, a in inputs.items()})
        moved = [self._ensure(n, s) for n, s in {**{n: a.shape for n, a in inputs.items()}, **out_shapes}.items()]
        key = tuple(a.shape for a in inputs.values())
        if any(moved) or (self._graph is not None and self._graph[0] != key):
            self._drop_graph()  # other shapes, or a buffer moved: the graph no longer fits
        for n, arr in inputs.items():
            if self._dtypes[n] == "bfloat16" and arr.itemsize != 2:
                raise InvalidInput(f"Expected 2-byte bfloat16 values for input '{n}' (e.g. ml_dtypes.bfloat16), found "
                                   f"{arr.dtype} with {arr.itemsize}-byte items. Convert the array.")
            self._buffers[n].upload(arr, stream)
        graph = self._graph[1] if self._graph is not None else None
        if graph is not None:
            graph.launch(stream)
        elif not self.context.execute_async_v3(stream.handle):
            raise CudaError(f"execute_async_v3 failed for '{self.manifest.name}': "
                            f"{' | '.join(self._logger.messages[-3:]) or 'no message'}")
        outputs = {}
        for n, shape in out_shapes.items():
            host = np.empty(shape, dtype=np.uint16 if self._dtypes[n] == "bfloat16" else self._dtypes[n])
            self._buffers[n].download(host, stream)
            outputs[n] = host
        stream.synchronize()
        if self.cuda_graph and graph is None and self.cuda_graph_error is None:
            self._capture(key)
        return {n: widen_bf16(a) if self._dtypes[n] == "bfloat16" else a for n, a in outputs.items()}

    def _capture(self, key: tuple[tuple[int, ...], ...]) -> None:
        """Capture the engine's work for the shapes just run (that run was the warm-up TensorRT
        needs after a shape change); on failure keep running without graphs and say why."""
        stream = self._live_stream()
        try:
            self._graph = (key, Graph(stream, lambda: self.context.execute_async_v3(stream.handle)))
        except Exception as exc:
            self.cuda_graph_error = f"{type(exc).__name__}: {exc}"

    def _live_stream(self) -> Stream:
        if self.stream is None:
            raise RuntimeError(f"the runner of '{self.manifest.name}' is closed; open the bundle again")
        return self.stream

    def _drop_graph(self) -> None:
        if self._graph is not None:
            self._graph[1].destroy()
            self._graph = None

    def __del__(self) -> None:
        # Device memory is not reclaimed by Python's garbage collector: free it with the runner.
        try:
            self.close()
        except Exception:
            pass

    def close(self) -> None:
        """Free graphs, buffers and the stream, then the context, engine and runtime (in that order)."""
        stream = getattr(self, "stream", None)
        if stream is None:  # closed, or __init__ failed before the stream existed
            return
        self._drop_graph()
        stream.synchronize()
        for buf in self._buffers.values():
            buf.free()
        self._buffers.clear()
        stream.destroy()
        self.stream = None
        for attr in ("context", "engine", "_runtime", "_owner"):
            self.__dict__.pop(attr, None)
