#!/usr/bin/env python3
"""Check the TensorRT runner's imports and API surface against the real lean runtime on a GPU.

No TensorRT builder can be installed in this workplace, so no plan can be built and nothing here
runs an engine. What this proves on a machine with an NVIDIA GPU, cuda-bindings and the
`tensorrt-lean-cu13` wheels: `tensorrt_lean` imports (and `tensorrt` fails the way the runner
expects), every attribute listed in runtimes/trt/runner.py RUNTIME_API exists on the real lean
module, the runner's logger subclass, host-code switch and failed deserialization behave as the
runner assumes, TrtRunner opens a bundle up to deserialization and refuses it with one paragraph,
and the cuda-bindings calls in runtimes/trt/cuda.py (device query, malloc, copies, stream, graph
capture and replay) work. Needs python3, numpy, cuda-bindings and the lean wheels; imports
`runtimes` from this checkout (numpy only). Prints JSON and writes $OUT/trt_lean_check.json.

Prepare the wheels here, from the repository root (about 45 MB: one device call carries them):

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d .whl \
        tensorrt-lean-cu13-bindings==11.4.0.106 tensorrt-lean-cu13-libs==11.4.0.106
    # tensorrt-lean-cu13 itself (the `tensorrt_lean` name) is an sdist: build its pure-Python wheel here
    python3 -m pip download --no-deps --no-binary=:all: -d /tmp/lean-sdist tensorrt-lean-cu13==11.4.0.106
    python3 -m pip wheel --no-deps --no-build-isolation -w .whl /tmp/lean-sdist/tensorrt_lean_cu13-11.4.0.106.tar.gz

Then run on the GPU machine (device tool, carry=[".whl"]):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && python3 bench/gpu/trt_lean_check.py
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

RESULTS: dict[str, Any] = {"checks": {}, "passed": None}


def check(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Run one check now; record its detail, or the exception that stopped it."""
    try:
        RESULTS["checks"][fn.__name__] = {"ok": True, "detail": fn()}
    except Exception as exc:
        RESULTS["checks"][fn.__name__] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                                          "traceback": traceback.format_exc(limit=4)}
    return fn


@check
def environment() -> dict[str, Any]:
    import numpy as np

    from runtimes._deps import version_of
    from runtimes.trt.cuda import device_info

    return {"python": platform.python_version(), "numpy": np.__version__,
            "cuda_bindings": version_of("cuda.bindings"), "gpu": device_info()}


@check
def imports() -> dict[str, Any]:
    """The runner's import helper: tensorrt_lean must import; tensorrt (absent here) must fail with
    an exception the runner catches (ImportError or OSError), not anything else."""
    from runtimes.trt.runner import import_runtime

    lean = import_runtime("tensorrt_lean")
    try:
        full = import_runtime("tensorrt")
        full_result = f"imported {full.__version__}"
    except (ImportError, OSError) as exc:
        full_result = f"{type(exc).__name__} (caught by the runner): {exc}"
    return {"tensorrt_lean": lean.__version__, "tensorrt": full_result}


@check
def api_surface() -> dict[str, Any]:
    """Every name in RUNTIME_API on the real lean module; plus the enum members the runner reads."""
    from runtimes.trt.runner import DTYPES, RUNTIME_API, import_runtime

    trt = import_runtime("tensorrt_lean")
    missing = []
    for owner, names in RUNTIME_API.items():
        target = trt if owner == "module" else getattr(trt, owner, None)
        missing += [f"{owner}.{n}" for n in names if target is None or not hasattr(target, n)]
    severity = {m: int(getattr(trt.ILogger.Severity, m)) for m in ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO")}
    modes = [m for m in ("INPUT", "OUTPUT") if not hasattr(trt.TensorIOMode, m)]
    dtypes = [d for d in DTYPES if not hasattr(trt.DataType, d)]
    absent_on_purpose = [n for n in ("Builder", "OnnxParser", "EngineInspector") if hasattr(trt, n)]
    problems = missing + [f"TensorIOMode.{m}" for m in modes] + [f"DataType.{d}" for d in dtypes]
    if problems:
        raise AssertionError(f"missing on tensorrt_lean: {problems}")
    return {"checked": sum(len(v) for v in RUNTIME_API.values()), "severity_values": severity,
            "builder_names_present_in_lean (expected none)": absent_on_purpose}


@check
def runtime_behaviour() -> dict[str, Any]:
    """The runner's ILogger subclass works with the real trampoline; the host-code switch sticks;
    a bad plan deserializes to None (not an exception) and the logger hears why."""
    from runtimes.trt.cuda import device_info
    from runtimes.trt.runner import import_runtime, make_logger

    # Without a working GPU the lean Runtime is a broken object that crashes the process (seen
    # on a CPU-only machine); the runner, too, queries the device before it makes a Runtime.
    device_info()
    trt = import_runtime("tensorrt_lean")
    logger = make_logger(trt)
    runtime = trt.Runtime(logger)
    runtime.engine_host_code_allowed = True
    allowed = bool(runtime.engine_host_code_allowed)
    engine = runtime.deserialize_cuda_engine(b"this is not a TensorRT plan" * 8)
    if engine is not None or not allowed:
        raise AssertionError(f"engine={engine!r}, engine_host_code_allowed={allowed}")
    return {"deserialize_garbage": "None", "logged": logger.messages[-3:]}


@check
def runner_refuses_a_bad_plan() -> dict[str, Any]:
    """TrtRunner through runtimes.load(trt_runtime='lean'): device query, compatibility check,
    logger, runtime and deserialization all run for real; the garbage plan must end in one
    IncompatibleEngine paragraph quoting TensorRT's log."""
    import runtimes
    from runtimes.manifest import IOSpec, Manifest, Target, TensorSpec, file_sha256
    from runtimes.trt.cuda import device_info
    from runtimes.trt.runner import import_runtime

    version = import_runtime("tensorrt_lean").__version__
    gpu = device_info()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bad-plan"
        bundle.mkdir()
        (bundle / "model.plan").write_bytes(b"not a plan" * 100)
        Manifest(
            name="bad-plan", source={"spec": "onnx:/nowhere/model.onnx"},
            io=IOSpec([TensorSpec("x", "float32", ("batch", 4))], [TensorSpec("y", "float32", ("batch", 4))]),
            precision={"requested": "fp32"},
            target=Target("trt", "cuda", ["model.plan"], options={"version_compatible": True},
                          versions={"tensorrt": version}, gpu={"name": gpu["name"],
                                                               "compute_capability": gpu["compute_capability"]}),
            build_command=["enginekit", "build", "onnx:/nowhere/model.onnx", "--target", "trt"],
            files={"model.plan": file_sha256(bundle / "model.plan")},
        ).write(bundle)
        try:
            runtimes.load(bundle, trt_runtime="lean")
        except runtimes.IncompatibleEngine as exc:
            text = str(exc)
            if "could not deserialize" not in text or "\n" in text:
                raise AssertionError(f"unexpected refusal: {text}") from None
            return {"refusal": text}
    raise AssertionError("a garbage plan was accepted")


@check
def cuda_calls() -> dict[str, Any]:
    """runtimes/trt/cuda.py for real: buffers, host<->device copies on a non-blocking stream, and a
    CUDA graph captured from device-to-device work, replayed twice."""
    import numpy as np

    from runtimes.trt.cuda import DeviceBuffer, Graph, Stream, call, runtime_api

    cudart = runtime_api()
    stream = Stream()
    data = np.random.default_rng(0).standard_normal(1 << 18).astype(np.float32)
    a, b = DeviceBuffer(data.nbytes), DeviceBuffer(data.nbytes)
    try:
        a.upload(data, stream)
        back = np.empty_like(data)
        a.download(back, stream)
        stream.synchronize()
        roundtrip = bool(np.array_equal(back, data))
        d2d = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice

        def enqueue() -> bool:
            call("cudaMemcpyAsync", cudart.cudaMemcpyAsync(b.ptr, a.ptr, data.nbytes, d2d, stream.stream))
            return True

        graph = Graph(stream, enqueue)
        replayed = []
        for scale in (2.0, 3.0):
            a.upload(data * scale, stream)
            graph.launch(stream)
            out = np.empty_like(data)
            b.download(out, stream)
            stream.synchronize()
            replayed.append(bool(np.array_equal(out, data * scale)))
        graph.destroy()
    finally:
        a.free()
        b.free()
        stream.destroy()
    if not (roundtrip and all(replayed)):
        raise AssertionError(f"roundtrip={roundtrip}, graph replays={replayed}")
    return {"bytes": int(data.nbytes), "roundtrip": roundtrip, "graph_replays": replayed}


def main() -> int:
    RESULTS["passed"] = all(c["ok"] for c in RESULTS["checks"].values())
    text = json.dumps(RESULTS, indent=2, default=str)
    print(text)
    out = os.environ.get("OUT")
    if out:
        Path(out, "trt_lean_check.json").write_text(text + "\n", encoding="utf-8")
    return 0 if RESULTS["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
