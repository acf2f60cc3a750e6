"""ONNX Runtime's transformer fusions (attention, skip-LayerNorm, bias-GELU) for the ORT target only.

The fusions come from onnxscript's ORT rewriter (`onnxscript.rewriter.ort_fusions`), applied through
transformers' `fuse_for_onnxruntime`, which adds the repairs ONNX Runtime needs for graphs exported
by torch.onnx's dynamo exporter (the form enginekit exports). The fused graph holds com.microsoft
ops, so it feeds only ONNX Runtime: the TensorRT target builds from the unfused lowered ONNX. The
parity gate runs on the fused engine, so a fusion that changed the numerics would fail the build.
Measured on all-MiniLM-L6-v2 (ORT CPU, 2 cores): 1.6x faster at batch 1, 1.35x at 8x128 tokens.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any


def fuse_for_ort(onnx_path: Path, out_path: Path, device: str) -> dict[str, Any]:
    """Write the fused graph to `out_path`; returns what was fused (empty when nothing matched)."""
    import onnx_ir as ir

    from runtimes.ort.build import needs_external_data

    try:
        from transformers.exporters.onnxruntime_fusions import fuse_for_onnxruntime
    except ImportError:  # transformers < 5: onnxscript's fusions alone
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        def fuse_for_onnxruntime(model: Any, _provider: str) -> None:
            optimize_for_ort(model)

    model = ir.load(str(onnx_path))
    before = sum(1 for _ in model.graph.all_nodes())
    fuse_for_onnxruntime(model, "cuda" if device == "cuda" else "cpu")
    fused = Counter(n.op_type for n in model.graph.all_nodes() if n.domain == "com.microsoft")
    big = needs_external_data(Path(onnx_path))
    ir.save(model, str(out_path), external_data=(out_path.name + ".data") if big else None)
    return {"fused_ops": dict(fused), "nodes_before": before, "nodes_after": sum(1 for _ in model.graph.all_nodes())}


def fusion_breaks(unfused: Path, engine: Path, io: Any, device: str, precision: str) -> str | None:
    """Why the fused engine is worse than the unfused graph, or None. Both run in ONNX Runtime on the
    build's device on inputs generated at the min and max shapes of `io`; the fused engine must load,
    run and match the unfused graph within `precision`'s gate tolerance. Found on tiny random models:
    GPT-2's fused graph refused at session creation ("Gemm input rank 3"), SigLIP's FusedMatMul failing at
    run time. Inconclusive (the unfused graph fails too, or the device's provider is missing): None."""
    import onnxruntime as ort

    from exporter.gate.cases import QUANTIZED_GENERATED
    from exporter.gate.parity import TolerancePolicy, compare_case
    from runtimes.samples import generate_feeds

    provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        return None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        plain = ort.InferenceSession(str(unfused), options, providers=[provider])
    except Exception:  # the build proper reports an unloadable graph
        return None
    try:
        fused = ort.InferenceSession(str(engine), options, providers=[provider])
    except Exception as exc:
        return f"the fused graph does not load: {_first_line(exc)}"
    # Two INT8 graphs differ where their dynamic scales differ: held to the floor the gate applies to generated
    # inputs of quantized engines (the gate proper then judges the fused engine against torch on real data).
    policy = TolerancePolicy(QUANTIZED_GENERATED) if precision in ("int8", "fp8") else TolerancePolicy.for_precision(precision)
    for i, point in enumerate(("min", "max")):
        try:
            feeds = _typed(plain, generate_feeds(io, point, seed=100 + i))
            want = dict(zip([o.name for o in plain.get_outputs()], plain.run(None, feeds)))
        except Exception:
            return None
        try:
            got = dict(zip([o.name for o in fused.get_outputs()], fused.run(None, _typed(fused, feeds))))
        except Exception as exc:
            return f"the fused graph fails at the {point} shapes: {_first_line(exc)}"
        case = compare_case(point, feeds, want, got, policy)
        if not case.passed:
            bad = next(o for o in case.outputs if o.failures)
            return f"the fused graph differs from the unfused one at the {point} shapes: {bad.name}: {bad.failures[0]}"
    return None


def _typed(session: Any, feeds: dict[str, Any]) -> dict[str, Any]:
    """`feeds` cast to the session's input dtypes (a lowered graph may take FP16), unknown names dropped."""
    import numpy as np

    kinds = {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(double)": np.float64}
    out = {}
    for spec in session.get_inputs():
        if spec.name in feeds:
            dtype = kinds.get(spec.type)
            out[spec.name] = np.asarray(feeds[spec.name]).astype(dtype) if dtype else feeds[spec.name]
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
