"""Accuracy of a quantized graph on held-out data, an accuracy budget, and per-layer sensitivity.

Accuracy compares the quantized graph with the FP32 graph, both run by ONNX Runtime on the
evaluation split, per sample: cosine between a sample's outputs (min and mean over samples) and
top-1 agreement (argmax over the last axis). A budget such as `cosine>=0.99` holds when every
float output's *worst* sample meets it; `top1>=0.99` applies to `logits*` outputs (to every float
output when none is so named); `OUTPUT:METRIC>=VALUE` picks one output.

Sensitivity: each quantized node is run alone (a one-node ONNX model) on the FP32 activations the
evaluation split produces, once with its float inputs and once with them fake-quantized with the
calibrated scales; the relative L2 error of its output ranks the nodes. The budget loop keeps the
worst nodes in float until the budget holds.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtimes.errors import UsageError

from .quantize import FP8_MAX, INT8_MAX, QUANT_OPS, _weight_axis

Feeds = dict[str, np.ndarray]
METRICS = ("cosine", "top1")
_TERM = re.compile(r"^(?:(?P<out>[^:=<>]+):)?(?P<metric>[a-z0-9_]+)\s*(?:>=|≥|=)\s*(?P<value>[0-9.eE+-]+)$")


@dataclass(frozen=True)
class Requirement:
    metric: str
    value: float
    output: str | None = None

    def __str__(self) -> str:
        return f"{self.output + ':' if self.output else ''}{self.metric}>={self.value:g}"


def parse_budget(text: str | None) -> list[Requirement]:
    """'cosine>=0.99', 'top1>=0.98', 'logits:top1>=0.98,cosine>=0.995'; 'none' or empty → no budget."""
    if text is None or text.strip().lower() in ("", "none"):
        return []
    reqs = []
    for part in text.split(","):
        m = _TERM.match(part.strip())
        if not m or m.group("metric") not in METRICS:
            raise UsageError(
                f"Expected --accuracy-budget as [OUTPUT:]METRIC>=VALUE[,...] with METRIC in {list(METRICS)}, found "
                f"'{part.strip()}'. Examples: cosine>=0.99 (every output's worst held-out sample), "
                "logits:top1>=0.98, none (quantize every candidate)."
            )
        try:
            value = float(m.group("value"))
        except ValueError:
            raise UsageError(f"Expected a number in --accuracy-budget '{part.strip()}'.") from None
        if not 0.0 < value <= 1.0:
            raise UsageError(f"Expected a budget value in (0, 1], found {value} in '{part.strip()}'.")
        reqs.append(Requirement(m.group("metric"), value, m.group("out")))
    return reqs


def run_outputs(session: Any, feeds: Sequence[Feeds]) -> list[dict[str, np.ndarray]]:
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(names, dict(f)))) for f in feeds]


def accuracy(reference: Sequence[Mapping[str, np.ndarray]], candidate: Sequence[Mapping[str, np.ndarray]],
             masks: Sequence[np.ndarray | None] | None = None) -> dict[str, dict[str, float]]:
    """Per float output: per-sample cosine (min, mean) and top-1 agreement over the samples. masks: each batch's
    attention_mask [batch, sequence]; positions it marks as padding are zeroed in both outputs shaped
    [batch, sequence, ...] (their values are unspecified), so they weigh nothing."""
    out: dict[str, dict[str, float]] = {}
    for name in reference[0]:
        ref = [np.asarray(r[name]) for r in reference]
        if ref[0].dtype.kind != "f":
            continue
        got = [np.asarray(c[name], dtype=np.float64) for c in candidate]
        cos, top1 = [], []
        for i, (r, g) in enumerate(zip(ref, got)):
            r = r.astype(np.float64)
            mask = masks[i] if masks is not None and i < len(masks) else None
            if mask is not None and r.shape[:2] == np.shape(mask) and r.ndim >= 3:
                keep = (np.asarray(mask) != 0).reshape(*np.shape(mask), *([1] * (r.ndim - 2)))
                r, g = r * keep, g * keep
            rows_r = r.reshape(r.shape[0], -1) if r.ndim >= 2 else r.reshape(1, -1)
            rows_g = g.reshape(rows_r.shape)
            num = (rows_r * rows_g).sum(1)
            den = np.linalg.norm(rows_r, axis=1) * np.linalg.norm(rows_g, axis=1)
            cos += np.where(den > 0, num / np.maximum(den, 1e-300), 1.0).tolist()
            if r.ndim >= 2 and r.shape[-1] > 1:
                top1 += (r.argmax(-1) == g.argmax(-1)).reshape(-1).tolist()
        out[name] = {"cosine_min": float(np.min(cos)), "cosine_mean": float(np.mean(cos)), "samples": len(cos)}
        if top1:
            out[name]["top1"] = float(np.mean(top1))
    return out


def mean_cosine(acc: Mapping[str, Mapping[str, float]]) -> float:
    """One score for an `accuracy()` result: the mean over outputs of their mean per-sample cosine. Ranking
    layers by it (rather than by the worst sample, which over a few dozen samples follows one of them)."""
    return float(np.mean([v["cosine_mean"] for v in acc.values()]))


def check_budget(acc: Mapping[str, Mapping[str, float]], budget: Sequence[Requirement]) -> list[str]:
    """The requirements `acc` misses, as readable strings (empty: the budget holds)."""
    misses = []
    logits = [n for n in acc if n.startswith("logits")]
    for req in budget:
        if req.output is not None:
            if req.output not in acc:
                raise UsageError(
                    f"Expected --accuracy-budget output '{req.output}' among the model's float outputs {sorted(acc)}."
                )
            names = [req.output]
        else:
            names = (logits or list(acc)) if req.metric == "top1" else list(acc)
        for name in names:
            key = "cosine_min" if req.metric == "cosine" else "top1"
            value = acc[name].get(key)
            if value is not None and value < req.value:
                misses.append(f"{name} {req.metric} {value:.4f} < {req.value:g}")
    return misses


# -- per-layer sensitivity --------------------------------------------------------------------------------
def _fake_quant(x: np.ndarray, amax: np.ndarray | float, precision: str, axis: int | None = None) -> np.ndarray:
    top = INT8_MAX if precision == "int8" else FP8_MAX
    a = np.maximum(np.asarray(amax, np.float32), 1e-12)
    if axis is not None:
        shape = [1] * x.ndim
        shape[axis] = -1
        a = a.reshape(shape)
    scale = a / top
    if precision == "int8":
        return (np.clip(np.rint(x / scale), -128, 127) * scale).astype(np.float32)
    import ml_dtypes

    return (np.clip(x / scale, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale)


def rank_sensitivity(model_path: Path, nodes: Sequence[str], ranges: Mapping[str, tuple[float, float]],
                     feeds: Sequence[Feeds], precision: str, work: Path, session: Callable[[Path], Any]) -> list[tuple[str, float]]:
    """(node, relative L2 error of its output when its inputs are quantized), worst first."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_path))
    inits = {i.name: i for i in model.graph.initializer}
    vinfo = {v.name: v for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    by_name = {n.name: n for n in model.graph.node}
    targets = [by_name[n] for n in nodes if n in by_name and by_name[n].op_type in QUANT_OPS]
    wanted = sorted({i for n in targets for i in n.input[:2] if i and i not in inits})
    graph_inputs = {i.name for i in model.graph.input}
    inner = [n for n in wanted if n not in graph_inputs and n in vinfo]  # shape inference typed them
    del model.graph.output[:]  # only the activations are needed
    model.graph.output.extend(vinfo[n] for n in inner)
    augmented = work / "sensitivity.onnx"
    onnx.save(model, str(augmented))
    sess = session(augmented)
    acts: dict[str, list[np.ndarray]] = {n: [] for n in inner + [n for n in wanted if n in graph_inputs]}
    for feed in feeds:
        for name, value in zip(inner, sess.run(inner, dict(feed))):
            acts[name].append(value)
        for name in wanted:
            if name in graph_inputs:
                acts[name].append(feed[name])
    scores = []
    for node in targets:
        act_inputs = [i for i in node.input if i and i not in inits]
        if not all(i in acts for i in act_inputs):
            continue  # an input without a known type cannot be run alone; the node stays quantized
        const = [inits[i] for i in node.input if i in inits]
        single = helper.make_model(
            helper.make_graph([node], "one", [helper.make_tensor_value_info(i, onnx.TensorProto.FLOAT, None) for i in act_inputs],
                              [helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)], const),
            opset_imports=model.opset_import, ir_version=model.ir_version)
        path = work / "one-node.onnx"
        onnx.save(single, str(path))
        one = session(path)
        one_q = one
        if len(node.input) > 1 and node.input[1] in inits:
            # The weight is fake-quantized per output channel, as the quantizer will store it.
            w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
            axis = _weight_axis(node) % w.ndim
            amax = np.abs(np.moveaxis(w, axis, 0)).reshape(w.shape[axis], -1).max(1)
            for init in single.graph.initializer:
                if init.name == node.input[1]:
                    init.CopyFrom(numpy_helper.from_array(_fake_quant(w, amax, precision, axis), init.name))
            onnx.save(single, str(path))
            one_q = session(path)
        err = ref = 0.0
        for b in range(len(feeds)):
            x = {i: acts[i][b] for i in act_inputs}
            y = one.run(None, x)[0].astype(np.float64)
            xq = {i: (_fake_quant(v, max(abs(ranges[i][0]), abs(ranges[i][1])), precision)
                      if i in node.input[:2] and i in ranges else v) for i, v in x.items()}
            yq = one_q.run(None, xq)[0].astype(np.float64)
            err += float(np.sum((yq - y) ** 2))
            ref += float(np.sum(y ** 2))
        scores.append((node.name, float(np.sqrt(err / ref)) if ref > 0 else 0.0))
    return sorted(scores, key=lambda kv: -kv[1])

