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
    split = _split_skip_layernorms(model) if device != "cuda" and _dynamic_int8(model) else 0
    fused = Counter(n.op_type for n in model.graph.all_nodes() if n.domain == "com.microsoft")
    big = needs_external_data(Path(onnx_path))
    ir.save(model, str(out_path), external_data=(out_path.name + ".data") if big else None)
    return {"fused_ops": dict(fused), "nodes_before": before, "nodes_after": sum(1 for _ in model.graph.all_nodes()),
            **({"unfused": {"SkipLayerNormalization": split, "reason": SPLIT_REASON}} if split else {})}


# ONNX Runtime 1.32's CPU SkipLayerNormalization is slower than the Add + LayerNormalization it replaces when
# its inputs come from the dynamic INT8 kernels: all-MiniLM-L6-v2 dynamic INT8, batch 8 x 21 tokens, 2 threads
# (2026-12-03, per-op profile): 12 SkipLayerNormalization 3.0 ms of a 12.0 ms run; split back, Add 0.75 ms +
# LayerNormalization 0.55 ms and the run 9.6 ms. ORT's own session-time SkipLayerNormFusion leaves the split
# pair alone in that graph. In the FP32 graph ORT re-fuses the pair when the session opens, and disabling that
# gained 4% (within the machine's noise), so FP32 keeps the fusion.
SPLIT_REASON = ("CPU dynamic INT8: Add + LayerNormalization measured faster than ONNX Runtime's "
                "SkipLayerNormalization (all-MiniLM-L6-v2, batch 8: 9.6 vs 12.0 ms)")


def _dynamic_int8(model: Any) -> bool:
    return any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat") for n in model.graph.all_nodes())


def _split_skip_layernorms(model: Any) -> int:
    """Replace each top-level SkipLayerNormalization (com.microsoft) whose mean and inverse-std outputs go
    unused by Add(input, skip) [+ bias] and LayerNormalization over the last axis; returns how many."""
    import onnx_ir as ir

    graph, count = model.graph, 0
    for node in list(graph):
        if node.op_type != "SkipLayerNormalization" or node.domain != "com.microsoft":
            continue
        if any(v is not None and (v.uses() or v.is_graph_output()) for v in node.outputs[1:3]):
            continue
        x, skip, gamma, beta, bias = (list(node.inputs) + [None] * 5)[:5]
        epsilon = node.attributes.get_float("epsilon", 1e-12)
        new = [ir.node("Add", [x, skip], name=f"{node.name}_add")]
        if bias is not None:
            new.append(ir.node("Add", [new[-1].outputs[0], bias], name=f"{node.name}_bias"))
        total = new[-1].outputs[0]
        new.append(ir.node("LayerNormalization", [total, gamma] + ([beta] if beta is not None else []),
                           {"axis": -1, "epsilon": epsilon}, name=f"{node.name}_ln"))
        old, replacement = [node.outputs[0]], [new[-1].outputs[0]]
        if len(node.outputs) > 3 and node.outputs[3] is not None:
            old.append(node.outputs[3])
            replacement.append(total)
        for value, like in zip(replacement, old):
            value.shape, value.type = like.shape, like.type
        ir.convenience.replace_nodes_and_values(graph, node, [node], new, old, replacement)
        count += 1
    return count


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
