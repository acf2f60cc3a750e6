"""SmoothQuant-style smoothing: move activation outliers into the weights before quantizing.

Transformer activations have a few channels far larger than the rest (all-MiniLM-L6-v2's
LayerNorm outputs reach 28 where most values stay within ±2), so one symmetric per-tensor INT8
scale leaves the ordinary channels a handful of levels. For an activation X that feeds MatMul/Gemm
nodes with constant weights W, X·W = (X / s)·(s·W) for any per-channel s > 0: dividing channel j
of X by s_j = sqrt(max|X_j| / max|W_j|) (alpha 0.5, Xiao et al. 2023) evens the activation's
channels, and the weights, quantized per output channel, absorb the factor at little cost.

The graph gets one Mul (X · 1/s) per smoothed activation, shared by its MatMul consumers; other
consumers (residual Adds) keep X. In FP32 the graph computes the same function (up to rounding);
TensorRT and ORT run the Mul as an ordinary elementwise op.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

ALPHA = 0.5


def _targets(model: Any) -> dict[str, list[Any]]:
    """Activation name → MatMul/Gemm consumers that take it as input A with a constant 2-D B."""
    inits = {i.name: i for i in model.graph.initializer}
    out: dict[str, list[Any]] = {}
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Gemm") or len(n.input) < 2 or n.input[0] in inits or n.input[1] not in inits:
            continue
        if len(inits[n.input[1]].dims) != 2:
            continue
        if n.op_type == "Gemm" and any(a.name == "transA" and a.i for a in n.attribute):
            continue
        out.setdefault(n.input[0], []).append(n)
    return out


def smooth_model(model_path: Path, output: Path, feeds: Iterable[dict[str, np.ndarray]], session: Any,
                 alpha: float = ALPHA) -> list[str]:
    """Write the smoothed graph of `model_path` to `output`; returns the smoothed activations.

    `session(path)` opens an ORT session (used once, to collect per-channel maxima of the
    activations over `feeds`)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_path))
    targets = _targets(model)
    vinfo = {v.name: v for v in model.graph.value_info}
    names = [t for t in targets if t in vinfo]
    if not names:
        onnx.save(model, str(output))
        return []
    probe = onnx.load(str(model_path))
    del probe.graph.output[:]
    probe.graph.output.extend(vinfo[n] for n in names)
    probe_path = Path(output).with_name("smooth-probe.onnx")
    onnx.save(probe, str(probe_path))
    sess = session(probe_path)
    wanted = {i.name for i in sess.get_inputs()}  # feeds may carry inputs this graph does not take
    amax: dict[str, np.ndarray] = {}
    for feed in feeds:
        for name, value in zip(names, sess.run(names, {k: v for k, v in feed.items() if k in wanted})):
            m = np.abs(value.reshape(-1, value.shape[-1])).max(0)
            amax[name] = np.maximum(amax.get(name, m), m)
    inits = {i.name: i for i in model.graph.initializer}
    done: list[str] = []
    for name in names:
        nodes = targets[name]
        weights = {n.input[1]: numpy_helper.to_array(inits[n.input[1]]).astype(np.float32) for n in nodes}
        transposed = {n.input[1]: any(a.name == "transB" and a.i for a in n.attribute) for n in nodes}
        # Per input channel j: max |W[j, :]| over every consumer (rows of B, or columns when transB).
        wmax = np.max([np.abs(w).max(0 if transposed[k] else 1) for k, w in weights.items()], axis=0)
        a = amax[name]
        if a.shape != wmax.shape:
            continue
        s = np.power(np.maximum(a, 1e-5), alpha) / np.power(np.maximum(wmax, 1e-5), 1 - alpha)
        s = np.clip(s, 1e-3, 1e3).astype(np.float32)
        for key, w in weights.items():
            scaled = w * (s[None, :] if transposed[key] else s[:, None])
            inits[key].CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), key))
        inv = f"{name}_enginekit_smooth_inv"
        smoothed = f"{name}_enginekit_smoothed"
        model.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
        model.graph.node.append(helper.make_node("Mul", [name, inv], [smoothed], name=f"{name}_enginekit_smooth"))
        for n in nodes:
            n.input[0] = smoothed
        done.append(name)
    _toposort(model)
    onnx.save(model, str(output))
    probe_path.unlink(missing_ok=True)
    return done


def _toposort(model: Any) -> None:
    """Appended Mul nodes go before their consumers: ONNX requires nodes in topological order."""
    produced = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    pending = list(model.graph.node)
    ordered: list[Any] = []
    while pending:
        rest = []
        for n in pending:
            if all(i in produced for i in n.input):
                ordered.append(n)
                produced.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):  # a subgraph/outer-scope input: keep the remaining order
            ordered += rest
            break
        pending = rest
    del model.graph.node[:]
    model.graph.node.extend(ordered)

