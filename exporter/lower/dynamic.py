"""Dynamic INT8 for ONNX Runtime's CPU target: onnxruntime.quantization.quantize_dynamic stores MatMul
weights as INT8 (per output channel) and quantizes activations per call, from each input's own range, so
no calibration data is needed and nothing is clipped on inputs unlike the calibration set. It is what
Optimum's CPU INT8 for transformers defaults to. Static Q/DQ (calibration/) stays the form for TensorRT
and ONNX Runtime CUDA, whose INT8 kernels take explicit scales.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from runtimes._deps import require
from runtimes.errors import BuildError
from runtimes.ort.build import needs_external_data

# MatMul/Gemm carry nearly all of a transformer's FLOPs; ORT's dynamic kernels (DynamicQuantizeMatMul,
# MatMulInteger) exist for them on x86 and ARM. Convolutions are left in FP32 (ConvInteger is slower than
# ORT's FP32 convolution on x86).
OPS = ("MatMul", "Gemm")


def quantize_dynamic_int8(onnx_path: Path, out_path: Path, *, feeds: Sequence[Mapping[str, Any]] = (),
                          budget: str | None = "cosine>=0.99", smooth: float | None = None,
                          range_feeds: Sequence[Mapping[str, Any]] = (), progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write the dynamic INT8 graph of `onnx_path` to `out_path`; returns what was quantized and kept in FP32.

    The unfused graph is quantized; the build stage fuses the result for ONNX Runtime (MultiHeadAttention,
    SkipLayerNorm and BiasGelu still match around MatMulInteger). Measured on all-MiniLM-L6-v2, 2 cores,
    batch 8 of 142 tokens, against the fused FP32 graph: quantize then fuse 1.87x, quantize unfused 1.50x,
    fuse then quantize 1.55x (its attention's QKV projection stays FP32 inside the fused Attention op).
    `feeds` rank the MatMuls for the accuracy budget (`--accuracy-budget`, per-sample worst cosine against the
    FP32 graph, padded positions left out). Where the all-INT8 graph misses it, SmoothQuant (`smooth`, alpha;
    default SMOOTH_ALPHA, 0 turns it off; its activation maxima come from `feeds` and `range_feeds`, inputs at
    the profile's largest shapes) is tried first and kept if it restores accuracy (see _smoothed); while the budget
    still misses, the node whose FP32 restores the most accuracy (mean cosine over the samples) stays FP32,
    up to a quarter of them."""
    import onnx

    say = progress or (lambda _m: None)
    source = Path(onnx_path)
    graph = onnx.load(str(source), load_external_data=False)
    weights = {t.name for t in graph.graph.initializer}
    candidates = [n.name for n in graph.graph.node if n.op_type in OPS and len(n.input) > 1 and n.input[1] in weights]
    if not candidates:
        raise BuildError(
            f"Expected MatMul/Gemm nodes with constant weights in {Path(onnx_path).name} for dynamic INT8, found none: "
            "INT8 would not change this model. Build fp32 or fp16."
        )
    kept, accuracy, smoothed = _within_budget(source, out_path, candidates, (feeds, range_feeds), budget, smooth, say)
    ops = Counter(n.op_type for n in onnx.load(str(out_path), load_external_data=False).graph.node)
    return {"quantization": "dynamic", "tool": f"onnxruntime.quantization.quantize_dynamic {_ort_version()}",
            "weights": "int8, symmetric, per output channel", "activations": "uint8, scales computed per call",
            "quantized_ops": {k: v for k, v in ops.items() if k in INTEGER_OPS},
            "fp32_nodes": [{"node": n, "reason": r} for n, r in kept.items()], "smoothquant": smoothed,
            **({"budget": budget, "ranking_samples": len(feeds), "accuracy": accuracy} if feeds else {})}


INTEGER_OPS = ("DynamicQuantizeMatMul", "MatMulInteger", "DynamicQuantizeLinear", "MatMulIntegerToFloat")


def _quantize(source: Path, out_path: Path, excluded: Sequence[str]) -> None:
    q = require("onnxruntime.quantization", extra="cpu", purpose="Dynamic INT8 quantization")
    try:
        q.quantize_dynamic(str(source), str(out_path), weight_type=q.QuantType.QInt8, per_channel=True,
                           op_types_to_quantize=list(OPS), nodes_to_exclude=list(excluded),
                           use_external_data_format=needs_external_data(source),
                           extra_options={"MatMulConstBOnly": True})
    except Exception as exc:  # onnxruntime.quantization raises plain exceptions for graphs it cannot rewrite
        raise BuildError(
            f"Expected onnxruntime.quantization.quantize_dynamic to quantize {source.name}, but it failed: "
            f"{type(exc).__name__}: {str(exc).strip()[:300]}. Use --quantization static with --calib DATA instead."
        ) from None


def _within_budget(source: Path, out_path: Path, candidates: list[str], samples: tuple[Sequence[Any], Sequence[Any]],
                   budget: str | None, smooth: float | None,
                   say: Callable[[str], None]) -> tuple[dict[str, str], dict[str, Any], dict[str, Any] | None]:
    """Quantize, smooth if that helps, then keep nodes in FP32 (best single-node gain first) until the budget
    holds on `feeds`. Returns the FP32 nodes, the accuracy on `feeds` and the smoothing record (None: not used)."""
    from calibration.budget import accuracy, check_budget, mean_cosine, parse_budget

    feeds, range_feeds = samples
    _quantize(source, out_path, [])
    # The ranking samples are few and from another corpus than service inputs: all-MiniLM-L6-v2's worst held-out
    # sentence came out up to 0.006 below the ranking set's worst. So the ranking aims a quarter closer to 1
    # (cosine>=0.99 ranks to 0.9925; aiming at 0.995 kept 9 of 36 MatMuls FP32 and cost a third of the speed-up);
    # the gate then judges the engine on --data as for every build.
    requirements = [replace(r, value=1 - (1 - r.value) * 0.75) for r in parse_budget(budget)]
    if not feeds or not requirements:
        return {}, {}, None
    masks = [f.get("attention_mask") for f in feeds]
    fp32 = _outputs(source, feeds)
    acc = accuracy(fp32, _outputs(out_path, feeds), masks)
    misses = check_budget(acc, requirements)
    if not misses:
        return {}, acc, None
    smoothed, source, acc = _smoothed(source, out_path, (feeds, range_feeds), smooth, (fp32, masks, acc), say)
    misses = check_budget(acc, requirements)
    if not misses:
        return {}, acc, smoothed
    say(f"Lowering precision to int8: {'; '.join(misses)}; ranking {len(candidates)} MatMuls")
    trial = out_path.with_name(out_path.stem + ".trial.onnx")
    gains = []
    for name in candidates:
        _quantize(source, trial, [name])
        single = accuracy(fp32, _outputs(trial, feeds), masks)
        gains.append((mean_cosine(single), name))
    gains.sort(reverse=True)
    kept: dict[str, str] = {}
    for rank, (_score, name) in enumerate(gains[:max(1, len(candidates) // 4)], 1):
        kept[name] = (f"accuracy budget {budget} (ranked to {'; '.join(map(str, requirements))}): rank {rank} of "
                      f"{len(candidates)} by the mean cosine it restores")
        _quantize(source, out_path, list(kept))
        acc = accuracy(fp32, _outputs(out_path, feeds), masks)
        if not check_budget(acc, requirements):
            break
    for leftover in trial.parent.glob(trial.name + "*"):
        leftover.unlink()
    return kept, acc, smoothed


# SmoothQuant's migration strength for dynamic INT8. On all-MiniLM-L6-v2 (every MatMul INT8, 300 held-out
# stdlib sentences, worst sentence-embedding cosine): none 0.9869, alpha 0.5 0.9759, alpha 0.7 0.9902 (maxima
# from the ranking sentences only) and 0.9926 (ranking sentences plus 2 random-token rows at 512 tokens).
# Per-call activation scales already follow each input's range, so only a strong migration into the weights
# (quantized per output channel) evens the outlier channels enough to matter. The maxima must cover every
# input length the bundle admits: from short sentences alone, random tokens at 512 fell to cosine 0.915
# (the unsmoothed graph: 0.9905), since channels quiet on short inputs were scaled up and then dominate the
# per-tensor range of long ones.
SMOOTH_ALPHA = 0.7


def _smoothed(source: Path, out_path: Path, samples: tuple[Sequence[Any], Sequence[Any]], alpha: float | None,
              baseline: tuple[Any, Any, dict[str, Any]],
              say: Callable[[str], None]) -> tuple[dict[str, Any] | None, Path, dict[str, Any]]:
    """Try SmoothQuant (calibration/smooth.py: per-channel activation maxima over both sample lists, one Mul
    per smoothed activation) before quantizing; keep it only if it raises the mean cosine on the ranking
    samples over the unsmoothed INT8 graph already in `out_path`. Returns (record or None, the graph to
    quantize from now on, its accuracy)."""
    from calibration.budget import accuracy, mean_cosine
    from calibration.calibrate import ort_session
    from calibration.smooth import smooth_model

    feeds, range_feeds = samples
    fp32, masks, acc = baseline
    alpha = SMOOTH_ALPHA if alpha is None else alpha
    if not alpha or needs_external_data(source):  # smooth_model rewrites the graph in one protobuf: 2 GB at most
        return None, source, acc
    say(f"Lowering precision to int8: trying SmoothQuant (alpha {alpha})")
    smooth_path = out_path.with_name(out_path.stem + ".smoothed.onnx")
    trial = out_path.with_name(out_path.stem + ".smooth-trial.onnx")
    done = smooth_model(source, smooth_path, [*feeds, *range_feeds], ort_session, alpha=alpha)
    if done:
        _quantize(smooth_path, trial, [])
        got = accuracy(fp32, _outputs(trial, feeds), masks)
        if mean_cosine(got) > mean_cosine(acc):
            trial.replace(out_path)
            return ({"alpha": alpha, "activations": done,
                     "statistics": f"{len(feeds)} ranking and {len(range_feeds)} generated max-shape batch(es)",
                     "reason": f"mean cosine on the ranking samples {mean_cosine(acc):.5f} unsmoothed, "
                               f"{mean_cosine(got):.5f} smoothed"}, smooth_path, got)
    trial.unlink(missing_ok=True)
    smooth_path.unlink(missing_ok=True)
    return None, source, acc


def _outputs(path: Path, feeds: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    from calibration.budget import run_outputs
    from calibration.calibrate import ort_session

    session = ort_session(path)
    names = {i.name for i in session.get_inputs()}
    return run_outputs(session, [{k: v for k, v in f.items() if k in names} for f in feeds])


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
