"""Choose CUDA provider options for an ORT bundle by measuring them (recorded in the manifest).

Candidates: cuDNN's convolution algorithm search (EXHAUSTIVE tries every algorithm once per
shape, HEURISTIC trusts cuDNN's pick) and, for conv nets, NHWC layout (`prefer_nhwc`: tensor
cores prefer channels-last), with and without cuDNN's fused convolution + bias epilogue
(`fuse_conv_bias`, cuDNN frontend graphs; ORT's CUDA EP leaves it off by default). Each candidate
opens a session and is timed at the opt shape with the same device-resident runner code the bench
and the service use; the fastest wins. A candidate the provider refuses is recorded, not chosen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exporter.timing import measure
from runtimes.manifest import Manifest
from runtimes.samples import generate_feeds


def candidates(onnx_path: Path) -> list[dict[str, Any]]:
    import onnx

    convs = sum(1 for n in onnx.load(str(onnx_path), load_external_data=False).graph.node if n.op_type == "Conv")
    options: list[dict[str, Any]] = [{"cudnn_conv_algo_search": "EXHAUSTIVE"}]
    if convs >= 4:  # NHWC and the algorithm search only matter where convolutions carry the work
        options += [{"cudnn_conv_algo_search": "HEURISTIC"}, {"cudnn_conv_algo_search": "EXHAUSTIVE", "prefer_nhwc": 1},
                    {"cudnn_conv_algo_search": "EXHAUSTIVE", "prefer_nhwc": 1, "fuse_conv_bias": 1}]
    return options


def tune_cuda(bundle: Path, manifest: Manifest, *, runs: int = 30) -> dict[str, Any]:
    """Time each candidate on `bundle`; returns {"chosen": options, "trials": [...]} (ms at opt)."""
    from runtimes.errors import EnginekitError
    from runtimes.ort.runner import OrtRunner

    feeds = generate_feeds(manifest.io, "opt", seed=7)
    trials: list[dict[str, Any]] = []
    for options in candidates(bundle / manifest.target.engine_files[0]):
        runner = None
        try:
            runner = OrtRunner(bundle, manifest.hashed(bundle), device="cuda", provider_options=options)
            slot = runner.prepare(feeds)
            stats = measure(lambda slot=slot, runner=runner: runner.run_prepared(slot), warmup=5, runs=runs)
        except Exception as exc:  # enginekit's refusal at session creation, or ORT's own types at run time
            if not trials:
                raise  # the first candidate is ORT's own defaults: a refusal there is the engine's problem
            # A candidate ORT refuses, at session creation (NHWC has no BF16 Conv) or at run time (ORT 1.31's NHWC
            # ran the tiny detector's INT8 Q/DQ depthwise Conv into "Input channels C is not equal to kernel
            # channels * group" on the H200, 12-02), is recorded as refused, not a failed build.
            reason = str(exc) if isinstance(exc, EnginekitError) else f"{type(exc).__name__}: {exc}"
            trials.append({"options": options, "refused": reason[:300]})
            continue
        finally:
            if runner is not None:
                runner.close()
        trials.append({"options": options, "p50_ms": round(stats["p50_ms"], 4)})
    best = min((t for t in trials if "p50_ms" in t), key=lambda t: t["p50_ms"])
    return {"chosen": best["options"], "trials": trials, "shape": "opt"}


def time_cuda_session(onnx_path: Path, feeds: dict[str, Any], cuda_options: dict[str, Any], *, runs: int = 30) -> float:
    """p50 ms of one ORT CUDA session on `feeds`, inputs and outputs bound on the device (no host copies
    in the timed loop, as the runner's prepared slots)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), so, providers=[
        ("CUDAExecutionProvider", {k: str(v) for k, v in cuda_options.items()}), "CPUExecutionProvider"])
    binding = session.io_binding()
    names = {i.name for i in session.get_inputs()}
    for name, value in feeds.items():
        if name in names:
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    for out in session.get_outputs():
        binding.bind_output(out.name, "cuda", 0)
    return float(measure(lambda: session.run_with_iobinding(binding), warmup=5, runs=runs)["p50_ms"])


def int8_vs_fp16(fp32_onnx: Path, int8_engine: Path, feeds: dict[str, Any], cuda_options: dict[str, Any],
                 work: Path) -> dict[str, Any]:
    """ORT CUDA latency of the INT8 (Q/DQ) engine against an FP16 graph of the same model at the opt shape.

    ORT's CUDA provider has no fused INT8 convolution or GEMM for the Q/DQ form: it runs each DequantizeLinear,
    the FP32 kernel and QuantizeLinear apart (TensorRT is what fuses Q/DQ into INT8 kernels). On the H200,
    ResNet-50's Q/DQ engine ran 2.7× (batch 1) and 3.5× (batch 32) slower than its FP16 engine (2026-12-01).
    The FP16 graph here is for timing only (onnxruntime.transformers.float16, FP32 inputs and outputs);
    what ships is the INT8 engine the user asked for, with this measurement in its manifest."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    fp16 = work / "model.fp16-timing.onnx"
    model = convert_float_to_float16(onnx.load(str(fp32_onnx)), keep_io_types=True, disable_shape_infer=True)
    big = model.ByteSize() > (1 << 30)
    onnx.save(model, str(fp16), save_as_external_data=big, location=fp16.name + ".data" if big else None)
    int8_ms = time_cuda_session(int8_engine, feeds, cuda_options)
    fp16_options = dict(cuda_options)
    try:
        fp16_ms = time_cuda_session(fp16, feeds, fp16_options)
    except Exception:  # ORT's own exception types
        if not fp16_options.pop("prefer_nhwc", None):
            raise
        # ORT 1.31's NHWC layout refused the tiny detector's FP16 depthwise convolution at run time on the H200
        # ("Input channels C is not equal to kernel channels * group", 12-02): the FP16 side in NCHW then
        fp16_ms = time_cuda_session(fp16, feeds, fp16_options)
    return {"device": "cuda", "int8_ms": round(int8_ms, 4), "fp16_ms": round(fp16_ms, 4), "fp16_options": fp16_options,
            "int8_over_fp16": round(int8_ms / fp16_ms, 3), "shapes": {k: list(v.shape) for k, v in feeds.items()},
            "method": "p50 of 30 runs after warm-up, ONNX Runtime CUDA with the engine's provider options, I/O on the "
                      "device; FP16 graph from onnxruntime.transformers.float16 (timing only)"}


def slow_int8_paragraph(speed: dict[str, Any]) -> str:
    """The build's warning when the INT8 engine is slower than FP16 on ORT CUDA."""
    return (f"Expected the INT8 engine to be faster than FP16 on ONNX Runtime's CUDA provider, but it measured "
            f"{speed['int8_ms']:.3f} ms against {speed['fp16_ms']:.3f} ms for FP16 at {speed['shapes']} "
            f"({speed['int8_over_fp16']:.2f}× slower): ORT's CUDA provider runs a Q/DQ graph as separate "
            "dequantize, FP32 and quantize kernels. Build --precision fp16 for speed on ORT CUDA, or use INT8 with "
            "--target trt, whose builder fuses Q/DQ into INT8 kernels. The INT8 engine was kept as asked; this "
            "measurement is in its manifest (calibration.speed).")
