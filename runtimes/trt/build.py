"""ONNX → TensorRT plan: a strongly typed network parsed from the lowered ONNX, one optimization
profile from the recorded dim ranges, a timing cache carried from build to build.

Written against TensorRT's own Python API rather than polygraphy's loaders: the parser's errors
are needed per node (polygraphy logs them as text and raises one message), the builder's defaults
must be ours (polygraphy's network is weakly typed on TensorRT 10 unless asked, and it pins a
dynamic dim without a profile to 1), and the runner must work with the lean runtime, which
polygraphy's runner cannot use. The calls used exist in both TensorRT 10 and 11: mypy checks
them against the 10.13 stubs (typings/), and a test checks that none of the names TensorRT 11
removed appear here.

Precision is not a builder setting: TensorRT 11 removed the FP16/BF16/INT8/FP8 flags, and a
strongly typed network computes in the types the ONNX graph carries (Cast and Q/DQ nodes put
there by exporter/lower/precision.py). TensorRT 10 builds that way with the STRONGLY_TYPED flag;
TensorRT 11 always does.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, SupportsInt

from .._deps import missing_dependency, version_of
from ..errors import BuildError, MissingDependency, UsageError
from ..manifest import IOSpec, Target
from .compat import AMPERE_CC, HARDWARE_COMPAT
from .cuda import CudaError, device_info

if TYPE_CHECKING:
    import tensorrt as trt_types

ENGINE_FILE = "model.plan"
TIMING_CACHE_FILE = "timing.cache"
LAYERS_FILE = "engine_layers.json"  # the engine inspector's JSON, one entry per layer
HARDWARE_LEVELS = {"none": "NONE", "ampere+": "AMPERE_PLUS", "same-cc": "SAME_COMPUTE_CAPABILITY"}
UNITS = {"": 1 << 20, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
         "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}
MAX_PARSER_ERRORS = 8  # listed in the BuildError; the rest are counted
Progress = Callable[[str], None]


def parse_size(text: str) -> int:
    """'512MiB', '4GiB', '1.5G' or a bare number of MiB → bytes (binary units throughout)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in UNITS or float(m.group(1)) <= 0:
        raise UsageError(
            f"Expected a size such as 512MiB or 4GiB (a bare number means MiB), found '{text}'. "
            "Give --workspace as NUMBER followed by B, KiB, MiB or GiB."
        )
    return int(float(m.group(1)) * UNITS[unit])


def format_size(nbytes: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes % size == 0:
            return f"{nbytes // size}{unit}"
    return f"{nbytes}B"


@dataclass(frozen=True)
class TrtBuildOptions:
    """Defaults: TensorRT's workspace (all GPU memory) and optimization level (3), no hardware or
    version compatibility, TF32 off (an FP32 graph means FP32 numerics), timing cache from the
    previous bundle at the output path when there is one.

    workspace: bytes (parse_size). opt_level: 0..5; level 0 ignores the timing cache.
    hardware_compat: 'none' | 'ampere+' | 'same-cc'. version_compatible: the plan runs on later
    TensorRT versions and on the lean runtime. exclude_lean_runtime: leave the lean runtime out of
    a version-compatible plan (smaller; needs the lean runtime of the same version to run).
    timing_cache: a cache file read before and updated after the build.
    """

    workspace: int | None = None
    opt_level: int | None = None
    hardware_compat: str = "none"
    version_compatible: bool = False
    exclude_lean_runtime: bool = False
    timing_cache: Path | None = None
    tf32: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.hardware_compat not in HARDWARE_COMPAT:
            problems.append(f"--hardware-compat must be one of {', '.join(HARDWARE_COMPAT)}, found '{self.hardware_compat}'")
        if self.opt_level is not None and not 0 <= self.opt_level <= 5:
            problems.append(f"--opt-level must be 0..5, found {self.opt_level}")
        if self.workspace is not None and self.workspace <= 0:
            problems.append(f"--workspace must be positive, found {self.workspace}")
        if self.exclude_lean_runtime and not self.version_compatible:
            problems.append("--exclude-lean-runtime only applies with --version-compatible")
        if problems:
            raise UsageError(f"Expected valid TensorRT build options, but {'; '.join(problems)}. See `enginekit build --help`.")

    def is_default(self) -> bool:
        return self == TrtBuildOptions()

    def cli_args(self) -> list[str]:
        """The `enginekit build` options that reproduce these settings (for the rebuild command)."""
        args = []
        if self.workspace:
            args += ["--workspace", format_size(self.workspace)]
        if self.opt_level is not None:
            args += ["--opt-level", str(self.opt_level)]
        if self.hardware_compat != "none":
            args += ["--hardware-compat", self.hardware_compat]
        args += ["--version-compatible"] * self.version_compatible + ["--exclude-lean-runtime"] * self.exclude_lean_runtime
        if self.timing_cache:
            args += ["--timing-cache", str(Path(self.timing_cache).resolve())]
        return args + ["--tf32"] * self.tf32


def profile_shapes(io: IOSpec) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shape of every input that has a named (dynamic) dim, from the dim ranges."""
    return {s.name: (io.shape_at(s, "min"), io.shape_at(s, "opt"), io.shape_at(s, "max"))
            for s in io.inputs if any(isinstance(d, str) for d in s.shape)}


@dataclass(frozen=True)
class ParserProblem:
    """One ONNX parser error, as TensorRT's ParserError reports it (node -1: not about one node)."""

    node: int
    name: str
    operator: str
    code: str
    desc: str

    def __str__(self) -> str:
        where = f"node {self.node} '{self.name}' ({self.operator})" if self.node >= 0 else "the graph"
        return f"{where}: {self.code}: {self.desc.strip()}"


def parser_error_message(onnx_path: Path, version: str, problems: list[ParserProblem]) -> str:
    listed = "; ".join(str(p) for p in problems[:MAX_PARSER_ERRORS])
    more = f"; and {len(problems) - MAX_PARSER_ERRORS} more" if len(problems) > MAX_PARSER_ERRORS else ""
    ops = sorted({p.operator for p in problems if p.operator})
    return (
        f"Expected TensorRT {version}'s ONNX parser to accept {onnx_path}, but it reported {len(problems)} "
        f"error(s): {listed}{more}. Look at those nodes with `enginekit inspect {onnx_path} --layers`; an "
        f"unsupported operator{' (' + ', '.join(ops) + ')' if ops else ''} needs another --opset, a newer "
        "TensorRT, or --target ort."
    )


@dataclass
class BuildProgress:
    """Turns TensorRT's progress-monitor calls into `progress` messages with a text bar.

    TensorRT calls the monitor from its own threads, and phases nest (a phase names its parent);
    the message shows the innermost phase, and is sent at most every `interval` seconds apart
    from phase starts, last steps and ends.
    """

    progress: Progress
    interval: float = 0.1
    _phases: dict[str, list[int]] = field(default_factory=dict)  # name → [done, total]
    _order: list[str] = field(default_factory=list)
    _last: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        with self._lock:
            self._phases[phase_name] = [0, max(int(num_steps), 1)]
            self._order.append(phase_name)
            self._emit(force=True)

    def step_complete(self, phase_name: str, step: int) -> bool:
        with self._lock:
            phase = self._phases.get(phase_name)
            if phase is not None:
                phase[0] = max(phase[0], int(step) + 1)  # threads may report steps out of order
            self._emit(force=phase is not None and phase[0] >= phase[1])  # always show a phase's last step
        return True  # False would ask TensorRT to cancel the build

    def phase_finish(self, phase_name: str) -> None:
        with self._lock:
            self._phases.pop(phase_name, None)
            if phase_name in self._order:
                self._order.remove(phase_name)
            self._emit(force=True)

    def message(self) -> str:
        if not self._order:
            return "building"
        name = self._order[-1]
        done, total = self._phases[name]
        filled = round(20 * min(done, total) / total)
        chain = " › ".join(self._order[-2:])
        return f"{chain} [{'#' * filled}{'.' * (20 - filled)}] {done}/{total}"

    def _emit(self, force: bool) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            try:
                self.progress(self.message())
            except Exception:
                pass


TYPE_NAMES = {"FLOAT": "FP32", "HALF": "FP16", "INT8": "INT8", "INT32": "INT32", "INT64": "INT64", "BOOL": "BOOL",
              "UINT8": "UINT8", "BF16": "BF16", "FP8": "FP8", "FP4": "FP4", "INT4": "INT4", "FP32": "FP32",
              "FP16": "FP16"}


def _tensor_type(tensor: Any) -> str:
    """The data type of one inspector tensor entry: TensorRT 11 has a 'DataType' field, TensorRT 10
    a combined 'Format/Datatype' text such as 'Row major linear FP16 format'."""
    if not isinstance(tensor, dict):
        return "unknown"
    if "DataType" in tensor:
        raw = str(tensor["DataType"]).upper()
        return TYPE_NAMES.get(raw, raw)
    for word in str(tensor.get("Format/Datatype", "")).replace("(", " ").replace(")", " ").split():
        if word.upper() in TYPE_NAMES:
            return TYPE_NAMES[word.upper()]
    return "unknown"


def summarize_layers(info: str) -> dict[str, Any]:
    """Layers per output data type from the engine inspector's JSON: the precision the engine
    actually computes in (e.g. {'FP16': 40, 'FP32': 6}). Without DETAILED profiling verbosity the
    inspector lists only names, and every layer counts as 'unknown'."""
    data = json.loads(info)
    layers = data.get("Layers", []) if isinstance(data, dict) else []
    counts: Counter[str] = Counter()
    for layer in layers:
        outputs = layer.get("Outputs") if isinstance(layer, dict) else None
        counts[_tensor_type(outputs[0]) if outputs else "unknown"] += 1
    return {"layers": len(layers), "by_output_type": dict(counts.most_common())}


def tensorrt_unavailable() -> str | None:
    """Why this machine cannot build a TensorRT engine (None when it can): the module, cuda-bindings
    and a CUDA GPU are all needed."""
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"the Python module 'tensorrt' cannot be imported ({exc})"
    try:
        device_info()
    except MissingDependency:
        return "the Python module 'cuda.bindings' (package cuda-bindings) cannot be imported"
    except CudaError as exc:
        return f"no CUDA GPU is usable ({exc})"
    return None


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build_trt_engine(onnx_path: Path, bundle_dir: Path, options: TrtBuildOptions, io: IOSpec, *,
                     previous_cache: Path | None = None, progress: Progress | None = None) -> Target:
    """Build `bundle_dir/model.plan` from `onnx_path` (its external data is read from beside it)
    and describe the target; also writes timing.cache and, when the engine can be inspected,
    engine_layers.json. previous_cache: a timing cache to start from when options.timing_cache
    names none (the pipeline passes the one of the bundle being replaced)."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:
        raise missing_dependency("tensorrt", extra="trt", purpose="Building a TensorRT engine", exc=exc) from None
    from .runner import make_logger

    say = progress or (lambda _msg: None)
    try:
        gpu = device_info()
    except CudaError as exc:
        raise BuildError(f"Expected a CUDA GPU to build a TensorRT engine on, but CUDA reports: {exc}. Build on a "
                         "machine with an NVIDIA GPU and driver.") from None
    cc = (int(gpu["compute_capability"][0]), int(gpu["compute_capability"][1]))
    if options.hardware_compat == "ampere+" and cc < AMPERE_CC:
        raise UsageError(f"Expected an Ampere or newer GPU (compute capability ≥ 8.0) to build an ampere+ plan, found "
                         f"{gpu['name']} ({cc[0]}.{cc[1]}). Build it on such a GPU, or drop --hardware-compat.")
    logger = make_logger(trt)
    trt.init_libnvinfer_plugins(logger, "")  # ONNX ops that TensorRT implements as plugins
    builder = trt.Builder(logger)
    say("parsing the ONNX graph")
    network, parser = _parse(trt, builder, logger, onnx_path, options)
    config = _configure(trt, builder, parser, options)
    profiles = _add_profile(trt, builder, network, config, io, logger)

    cache_source = options.timing_cache if options.timing_cache and Path(options.timing_cache).is_file() else previous_cache
    cache_info = _attach_timing_cache(config, cache_source)
    monitor = _progress_monitor(BuildProgress(say))
    config.progress_monitor = monitor  # keep `monitor` referenced until the build returns
    started = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError(
            f"Expected TensorRT {trt.__version__} to build an engine from {onnx_path}, but the build failed: "
            f"{' | '.join(logger.messages[-4:]) or 'no message'}. Try a larger --workspace, or --target ort."
        )
    plan_bytes = bytes(plan)
    (bundle_dir / ENGINE_FILE).write_bytes(plan_bytes)
    cache_bytes = bytes(config.get_timing_cache().serialize())
    (bundle_dir / TIMING_CACHE_FILE).write_bytes(cache_bytes)
    if options.timing_cache:
        _write_atomic(Path(options.timing_cache), cache_bytes)
    say("inspecting the engine")
    layers = _inspect(logger, plan_bytes, bundle_dir, options)
    return Target(
        backend="trt",
        device="cuda",
        engine_files=[ENGINE_FILE],
        options={
            "strongly_typed": True,
            "workspace_bytes": config.get_memory_pool_limit(trt.MemoryPoolType.WORKSPACE),
            "opt_level": config.builder_optimization_level,
            "tf32": options.tf32,
            "hardware_compat": options.hardware_compat,
            "version_compatible": options.version_compatible,
            "exclude_lean_runtime": options.exclude_lean_runtime,
            "profiles": [{n: {"min": list(lo), "opt": list(opt), "max": list(hi)} for n, (lo, opt, hi) in profiles.items()}],
            "timing_cache": {**cache_info, "saved_bytes": len(cache_bytes)},
            "layers": layers,
            "build_seconds": round(time.perf_counter() - started, 2),
            "plan_bytes": len(plan_bytes),
        },
        versions={"tensorrt": trt.__version__, "cuda_runtime": gpu["cuda_runtime"], "cuda_driver": gpu["cuda_driver"],
                  "cuda-bindings": version_of("cuda.bindings")},
        gpu={"name": gpu["name"], "compute_capability": list(cc)},
    )


def _parse(trt: Any, builder: trt_types.Builder, logger: Any, onnx_path: Path,
           options: TrtBuildOptions) -> tuple[trt_types.INetworkDefinition, trt_types.OnnxParser]:
    """A strongly typed network parsed from `onnx_path`; every parser error is reported at once."""
    major = int(trt.__version__.split(".")[0])
    # TensorRT 11 networks are always strongly typed (the flag is deprecated and ignored there).
    network = builder.create_network(0 if major >= 11 else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if options.version_compatible or options.hardware_compat != "none":
        parser.set_flag(trt.OnnxParserFlag.NATIVE_INSTANCENORM)  # the default; compatible plans require it
    # parse_from_file, not parse(bytes): it resolves external data relative to the model file.
    if not parser.parse_from_file(str(onnx_path)):
        problems = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            problems.append(ParserProblem(int(err.node()), err.node_name(), err.node_operator(), err.code().name,
                                          err.desc()))
        raise BuildError(parser_error_message(onnx_path, trt.__version__, problems))
    return network, parser


def _configure(trt: Any, builder: trt_types.Builder, parser: trt_types.OnnxParser,
               options: TrtBuildOptions) -> trt_types.IBuilderConfig:
    """The builder config: workspace, optimization level, TF32 off unless asked, detailed profiling
    verbosity (for the engine inspector), hardware and version compatibility."""
    config = builder.create_builder_config()
    if options.workspace:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace)
    if options.opt_level is not None:
        config.builder_optimization_level = options.opt_level
    if not options.tf32:
        # TF32 (on by default) rounds FP32 matmul/conv inputs to 10 mantissa bits: an FP32 graph
        # would no longer compute what the parity gate's FP32 tolerance expects.
        config.clear_flag(trt.BuilderFlag.TF32)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, HARDWARE_LEVELS[options.hardware_compat])
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        if options.exclude_lean_runtime:
            config.set_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)
        plugins = list(parser.get_used_vc_plugin_libraries())
        if plugins:
            config.plugins_to_serialize = plugins
    return config


def _add_profile(trt: Any, builder: trt_types.Builder, network: trt_types.INetworkDefinition,
                 config: trt_types.IBuilderConfig, io: IOSpec, logger: Any) -> dict[str, Any]:
    """One optimization profile from the recorded dim ranges; a dynamic input without one is refused."""
    profiles = profile_shapes(io)
    unranged = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = [tensor.shape[d] for d in range(len(tensor.shape))]
        if -1 in shape and tensor.name not in profiles:
            unranged.append(f"{tensor.name} {shape}")
    if unranged:
        raise BuildError(
            f"Expected a recorded range for every dynamic input dim, but TensorRT sees dynamic inputs without one: "
            f"{', '.join(unranged)}. Name those dims and give their ranges with --shapes NAME=MIN:OPT:MAX."
        )
    if profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profiles.items():
            profile.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
        if config.add_optimization_profile(profile) < 0:
            raise BuildError(f"Expected TensorRT to accept the optimization profile {profiles}, but it refused it: "
                             f"{' | '.join(logger.messages[-3:])}. Check the ranges given with --shapes.")
    return profiles


def _attach_timing_cache(config: trt_types.IBuilderConfig, source: Path | None) -> dict[str, Any]:
    """Start the build from `source`'s timing cache when it fits this GPU and TensorRT, else from an
    empty one; say which in the manifest."""
    if source is not None and Path(source).is_file():
        data = Path(source).read_bytes()
        try:
            cache = config.create_timing_cache(data)
            if config.set_timing_cache(cache, False):  # False: refuse a cache from another device
                return {"loaded_from": str(source), "loaded_bytes": len(data)}
            note = "it was made for another GPU or TensorRT version"
        except Exception as exc:
            note = f"it could not be read ({exc})"
        config.set_timing_cache(config.create_timing_cache(b""), False)
        return {"loaded_from": None, "ignored": f"{source}: {note}"}
    config.set_timing_cache(config.create_timing_cache(b""), False)
    return {"loaded_from": None}


def _progress_monitor(progress: BuildProgress) -> trt_types.IProgressMonitor:
    import tensorrt as trt

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)  # pybind11 trampolines need the base initialised explicitly

        # SupportsInt, not int: the TensorRT 11 bindings declare these parameters so.
        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: SupportsInt) -> None:
            progress.phase_start(phase_name, parent_phase, int(num_steps))

        def step_complete(self, phase_name: str, step: SupportsInt) -> bool:
            return progress.step_complete(phase_name, int(step))

        def phase_finish(self, phase_name: str) -> None:
            progress.phase_finish(phase_name)

    return Monitor()


def _inspect(logger: Any, plan: bytes, bundle_dir: Path, options: TrtBuildOptions) -> dict[str, Any]:
    """Per-layer types from the engine inspector (full TensorRT only), saved as engine_layers.json;
    a summary for the manifest, or why there is none."""
    import tensorrt as trt

    from .compat import PlanInfo
    from .runner import open_runtime

    info = PlanInfo(trt.__version__, None, "", options.version_compatible, options.exclude_lean_runtime)
    runtime, _owner = open_runtime(trt, "tensorrt", logger, info)  # our own plan, just built
    engine = runtime.deserialize_cuda_engine(plan) if runtime is not None else None
    if engine is None:
        return {"available": False, "reason": f"the plan could not be deserialized here: {' | '.join(logger.messages[-2:])}"}
    text = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    (bundle_dir / LAYERS_FILE).write_text(text, encoding="utf-8")
    try:
        return {"available": True, "file": LAYERS_FILE, **summarize_layers(text)}
    except (ValueError, AttributeError, TypeError) as exc:
        return {"available": True, "file": LAYERS_FILE, "summary_error": str(exc)}
