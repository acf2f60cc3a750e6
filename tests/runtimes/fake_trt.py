"""Stand-ins for `tensorrt`, `tensorrt_lean` and `cuda.bindings.runtime`, so that CPU tests can run
enginekit's TensorRT glue code (pipeline wiring, flags, profiles, timing cache, runner buffers,
CUDA-graph bookkeeping) where neither TensorRT nor a GPU exists.

This is NOT TensorRT and proves nothing about it: the "plan" is a JSON header plus the ONNX bytes,
"execution" runs that ONNX with ONNX Runtime on host memory that plays the device, and a "CUDA
graph" replays the recorded Python calls. Only the calls runtimes/trt makes exist here, with the
names and argument order of TensorRT's Python API (which mypy checks against the stubs in
typings/). The real thing is tested by the `trt` tests on a machine that has it.
"""

from __future__ import annotations

import ctypes
import enum
import json
import sys
import types
from typing import Any

import numpy as np
import onnx

MAGIC = b"FAKEPLAN\n"
_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32, "BOOL": np.bool_,
       "INT8": np.int8, "UINT8": np.uint8}
_FROM_ONNX = {onnx.TensorProto.FLOAT: "FLOAT", onnx.TensorProto.FLOAT16: "HALF", onnx.TensorProto.INT64: "INT64",
              onnx.TensorProto.INT32: "INT32", onnx.TensorProto.BOOL: "BOOL"}
UNSUPPORTED_DOMAIN = "com.example"  # nodes of this domain make the fake parser fail


class Dims(list):  # type: ignore[type-arg]
    pass


# -- cuda.bindings.runtime ---------------------------------------------------------------------------
class FakeCuda:
    def __init__(self, devices: int = 1, cc: tuple[int, int] = (9, 0)) -> None:
        self.devices, self.cc = devices, cc
        self.memory: dict[int, Any] = {}
        self.capturing: dict[int, list[Any]] = {}
        self.graph_launches = 0
        self.cudaError_t = enum.IntEnum("cudaError_t", {"cudaSuccess": 0, "cudaErrorNoDevice": 100,
                                                         "cudaErrorInvalidValue": 1})
        self.cudaMemcpyKind = enum.IntEnum("cudaMemcpyKind", {"cudaMemcpyHostToDevice": 1, "cudaMemcpyDeviceToHost": 2})
        self.cudaStreamCaptureMode = enum.IntEnum("cudaStreamCaptureMode", {"cudaStreamCaptureModeThreadLocal": 1})
        self.cudaStreamNonBlocking = 1
        self._streams = 0

    def module(self) -> types.ModuleType:
        mod = types.ModuleType("cuda.bindings.runtime")
        for name in dir(self):
            if name.startswith("cuda"):
                setattr(mod, name, getattr(self, name))
        return mod

    def cudaGetErrorName(self, err: int) -> tuple[int, bytes]:
        return 0, self.cudaError_t(err).name.encode()

    def cudaGetErrorString(self, err: int) -> tuple[int, bytes]:
        return 0, b"fake error"

    def cudaGetDeviceCount(self) -> tuple[int, Any]:
        return (0, self.devices) if self.devices else (100, None)

    def cudaGetDeviceProperties(self, dev: int) -> tuple[int, Any]:
        return 0, types.SimpleNamespace(name=b"Fake GPU\0\0", major=self.cc[0], minor=self.cc[1])

    def cudaRuntimeGetVersion(self) -> tuple[int, int]:
        return 0, 13000

    def cudaDriverGetVersion(self) -> tuple[int, int]:
        return 0, 13000

    def cudaStreamCreateWithFlags(self, flags: int) -> tuple[int, int]:
        self._streams += 1
        return 0, 1000 + self._streams

    def cudaStreamSynchronize(self, stream: int) -> tuple[int]:
        return (0,)

    def cudaStreamDestroy(self, stream: int) -> tuple[int]:
        return (0,)

    def cudaMalloc(self, nbytes: int) -> tuple[int, int]:
        buf = ctypes.create_string_buffer(nbytes)
        self.memory[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    def cudaFree(self, ptr: int) -> tuple[int]:
        return (0,) if self.memory.pop(ptr, None) is not None else (1,)

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> tuple[int]:
        ctypes.memmove(dst, src, nbytes)
        return (0,)

    def cudaStreamBeginCapture(self, stream: int, mode: int) -> tuple[int]:
        self.capturing[int(stream)] = []
        return (0,)

    def cudaStreamEndCapture(self, stream: int) -> tuple[int, Any]:
        return 0, self.capturing.pop(int(stream))

    def cudaGraphInstantiate(self, graph: Any, flags: int) -> tuple[int, Any]:
        return 0, list(graph)

    def cudaGraphLaunch(self, graph_exec: Any, stream: int) -> tuple[int]:
        self.graph_launches += 1
        for op in graph_exec:
            op()
        return (0,)

    def cudaGraphExecDestroy(self, graph_exec: Any) -> tuple[int]:
        return (0,)

    def cudaGraphDestroy(self, graph: Any) -> tuple[int]:
        return (0,)


# -- tensorrt ------------------------------------------------------------------------------------------
def make_tensorrt(cuda: FakeCuda, version: str = "10.13.0.35", name: str = "tensorrt", lean: bool = False) -> Any:
    trt = types.ModuleType(name)
    trt.__version__ = version
    major = int(version.split(".")[0])
    Severity = enum.IntEnum("Severity", {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3, "VERBOSE": 4})
    DataType = enum.IntEnum("DataType", {k: i for i, k in enumerate(["FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8",
                                                                      "FP8", "BF16", "INT64"])})
    TensorIOMode = enum.IntEnum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})

    class ILogger:
        def __init__(self) -> None:
            pass

    ILogger.Severity = Severity  # type: ignore[attr-defined]

    class Engine:
        def __init__(self, header: dict[str, Any], model_bytes: bytes) -> None:
            import onnxruntime as ort

            self.header, self.model_bytes = header, model_bytes
            model = onnx.load_from_string(model_bytes)
            self.session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
            inits = {i.name for i in model.graph.initializer}
            self.io: dict[str, tuple[Any, Any, list[int]]] = {}
            for vi, mode in [(i, TensorIOMode.INPUT) for i in model.graph.input if i.name not in inits] + \
                            [(o, TensorIOMode.OUTPUT) for o in model.graph.output]:
                shape = [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]
                self.io[vi.name] = (mode, DataType[_FROM_ONNX[vi.type.tensor_type.elem_type]], shape)
            self.names = list(self.io)
            self.num_io_tensors = len(self.names)

        def get_tensor_name(self, i: int) -> str:
            return self.names[i]

        def get_tensor_mode(self, name: str) -> Any:
            return self.io[name][0]

        def get_tensor_dtype(self, name: str) -> Any:
            return self.io[name][1]

        def get_tensor_shape(self, name: str) -> Dims:
            return Dims(self.io[name][2])

        def get_tensor_profile_shape(self, name: str, profile: int) -> list[Dims]:
            p = self.header["profiles"][name]
            return [Dims(p["min"]), Dims(p["opt"]), Dims(p["max"])]

        def is_shape_inference_io(self, name: str) -> bool:
            return False

        def create_execution_context(self) -> Any:
            return Context(self)

        def create_engine_inspector(self) -> Any:
            layers = [{"Name": n.name, "Outputs": [{"Name": "t", "Format/Datatype": "Row major linear FP32 format"}]}
                      for n in onnx.load_from_string(self.model_bytes).graph.node]
            return types.SimpleNamespace(get_engine_information=lambda fmt: json.dumps({"Layers": layers}))

    class Context:
        def __init__(self, engine: Engine) -> None:
            self.engine, self.shapes, self.addresses = engine, {}, {}
            self.executions = 0

        def set_input_shape(self, name: str, shape: Any) -> bool:
            self.shapes[name] = tuple(shape)
            return True

        def _feeds(self, zeros: bool) -> dict[str, np.ndarray]:
            feeds = {}
            for n, shape in self.shapes.items():
                dtype = _NP[self.engine.io[n][1].name]
                if zeros:
                    feeds[n] = np.zeros(shape, dtype)
                else:
                    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
                    feeds[n] = np.frombuffer(ctypes.string_at(self.addresses[n], nbytes), dtype).reshape(shape)
            return feeds

        def infer_shapes(self) -> list[str]:
            outs = self.engine.session.run(None, self._feeds(zeros=True))
            names = [o.name for o in self.engine.session.get_outputs()]
            self.out_shapes = {n: o.shape for n, o in zip(names, outs)}
            return []

        def get_tensor_shape(self, name: str) -> Dims:
            return Dims(self.out_shapes[name])

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            self.addresses[name] = int(ptr)
            return True

        def execute_async_v3(self, stream: int) -> bool:
            shapes, addresses = dict(self.shapes), dict(self.addresses)

            def run() -> None:
                self.shapes, self.addresses = shapes, addresses
                self.executions += 1
                names = [o.name for o in self.engine.session.get_outputs()]
                for n, out in zip(names, self.engine.session.run(None, self._feeds(zeros=False))):
                    out = np.ascontiguousarray(out)
                    ctypes.memmove(self.addresses[n], out.ctypes.data, out.nbytes)

            if int(stream) in cuda.capturing:
                cuda.capturing[int(stream)].append(run)
            else:
                run()
            return True

    class Runtime:
        def __init__(self, logger: Any) -> None:
            self.logger, self.engine_host_code_allowed = logger, False

        def load_runtime(self, path: str) -> Any:
            trt.lean_libraries_loaded.append(path)
            return Runtime(self.logger)

        def deserialize_cuda_engine(self, blob: bytes) -> Any:
            if not bytes(blob).startswith(MAGIC):
                self.logger.log(Severity.ERROR, "fake: not a plan")
                return None
            head, model_bytes = bytes(blob)[len(MAGIC):].split(b"\n", 1)
            header = json.loads(head)
            if header["version_compatible"] and not self.engine_host_code_allowed:
                self.logger.log(Severity.ERROR, "fake: plan has host code and engine_host_code_allowed is False")
                return None
            if lean and not header["version_compatible"]:
                self.logger.log(Severity.ERROR, "fake: the lean runtime needs a version-compatible plan")
                return None
            return Engine(header, model_bytes)

    trt.lean_libraries_loaded = []
    for obj in (ILogger, Runtime, TensorIOMode, DataType):
        setattr(trt, obj.__name__, obj)
    if not lean:
        _add_builder(trt, Severity, major)
    return trt


class HostMemory:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def __bytes__(self) -> bytes:
        return self.data


def _add_builder(trt: Any, Severity: Any, major: int) -> None:
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag",
                                                     {"STRONGLY_TYPED": 1 if major < 11 else 0})
    trt.OnnxParserFlag = enum.IntEnum("OnnxParserFlag", {"NATIVE_INSTANCENORM": 0})
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0})
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", {"TF32": 7, "VERSION_COMPATIBLE": 12, "EXCLUDE_LEAN_RUNTIME": 13})
    trt.ProfilingVerbosity = enum.IntEnum("ProfilingVerbosity", {"LAYER_NAMES_ONLY": 0, "NONE": 1, "DETAILED": 2})
    trt.HardwareCompatibilityLevel = enum.IntEnum("HardwareCompatibilityLevel",
                                                  {"NONE": 0, "AMPERE_PLUS": 1, "SAME_COMPUTE_CAPABILITY": 2})
    trt.LayerInformationFormat = enum.IntEnum("LayerInformationFormat", {"ONELINE": 0, "JSON": 1})
    trt.Dims = Dims
    trt.built = []  # every (network, config) built, for the tests to look at
    trt.init_libnvinfer_plugins = lambda logger, namespace: True

    class IProgressMonitor:
        def __init__(self) -> None:
            pass

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags, self.model = flags, None

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        def get_input(self, i: int) -> Any:
            vi = self.inputs[i]
            return types.SimpleNamespace(name=vi.name, shape=Dims(
                d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim))

    class ParserError:
        def __init__(self, index: int, node: Any) -> None:
            self.index, self.n = index, node

        def node(self) -> int:
            return self.index

        def node_name(self) -> str:
            return str(self.n.name)

        def node_operator(self) -> str:
            return str(self.n.op_type)

        def code(self) -> Any:
            return types.SimpleNamespace(name="UNSUPPORTED_NODE")

        def desc(self) -> str:
            return f"no importer for {self.n.domain}::{self.n.op_type}"

    class OnnxParser:
        def __init__(self, network: Network, logger: Any) -> None:
            self.network, self.errors, self.flags = network, [], set()

        def set_flag(self, flag: Any) -> None:
            self.flags.add(flag)

        def parse_from_file(self, path: str) -> bool:
            model = onnx.load(path)  # with its external data, as TensorRT resolves it beside the file
            self.errors = [ParserError(i, n) for i, n in enumerate(model.graph.node) if n.domain == UNSUPPORTED_DOMAIN]
            inits = {i.name for i in model.graph.initializer}
            self.network.model = model
            self.network.inputs = [i for i in model.graph.input if i.name not in inits]
            return not self.errors

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, i: int) -> ParserError:
            return self.errors[i]

        def get_used_vc_plugin_libraries(self) -> list[str]:
            return []

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def serialize(self) -> HostMemory:
            return HostMemory(self.data + b"+tuned")

    class Config:
        def __init__(self) -> None:
            self.flags = {trt.BuilderFlag.TF32}
            self.pools = {trt.MemoryPoolType.WORKSPACE: 80 << 30}
            self.builder_optimization_level = 3
            self.profiles, self.cache, self.progress_monitor = [], None, None
            self.profiling_verbosity = self.hardware_compatibility_level = None
            self.plugins_to_serialize: list[str] = []

        def set_memory_pool_limit(self, pool: Any, nbytes: int) -> None:
            self.pools[pool] = nbytes

        def get_memory_pool_limit(self, pool: Any) -> int:
            return self.pools[pool]

        def set_flag(self, flag: Any) -> None:
            self.flags.add(flag)

        def clear_flag(self, flag: Any) -> None:
            self.flags.discard(flag)

        def add_optimization_profile(self, profile: Any) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data: bytes) -> TimingCache:
            return TimingCache(bytes(data))

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            if cache.data.startswith(b"OTHER-GPU"):
                return False
            self.cache = cache
            return True

        def get_timing_cache(self) -> TimingCache:
            return self.cache

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, Any] = {}

        def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
            self.shapes[name] = {"min": list(lo), "opt": list(opt), "max": list(hi)}

    class Builder:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def create_network(self, flags: int) -> Network:
            return Network(flags)

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> HostMemory:
            monitor = config.progress_monitor
            monitor.phase_start("Building engine", None, 2)
            for step in range(2):
                monitor.step_complete("Building engine", step)
            monitor.phase_finish("Building engine")
            trt.built.append((network, config))
            header = {"version_compatible": trt.BuilderFlag.VERSION_COMPATIBLE in config.flags,
                      "profiles": config.profiles[0].shapes if config.profiles else {}}
            return HostMemory(MAGIC + json.dumps(header).encode() + b"\n" + network.model.SerializeToString())

    for obj in (IProgressMonitor, OnnxParser, Builder):
        setattr(trt, obj.__name__, obj)


def install(monkeypatch: Any, *, version: str = "10.13.0.35", lean_version: str | None = None, full: bool = True,
            cc: tuple[int, int] = (9, 0)) -> types.SimpleNamespace:
    """Put the fakes in sys.modules for one test; returns them (cuda, trt, lean)."""
    cuda = FakeCuda(cc=cc)
    mod = cuda.module()
    pkg = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = mod  # type: ignore[attr-defined]
    bindings.__version__ = "13.0.0"  # type: ignore[attr-defined]
    pkg.bindings = bindings  # type: ignore[attr-defined]
    for name, m in (("cuda", pkg), ("cuda.bindings", bindings), ("cuda.bindings.runtime", mod)):
        monkeypatch.setitem(sys.modules, name, m)
    trt = make_tensorrt(cuda, version) if full else None
    monkeypatch.setitem(sys.modules, "tensorrt", trt)  # None makes `import tensorrt` raise ImportError
    lean = make_tensorrt(cuda, lean_version, "tensorrt_lean", lean=True) if lean_version else None
    monkeypatch.setitem(sys.modules, "tensorrt_lean", lean)
    return types.SimpleNamespace(cuda=cuda, trt=trt, lean=lean)
