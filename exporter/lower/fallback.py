"""Parity-driven FP32 fallback: which nodes of a lowered graph break parity, and why.

Both graphs run on the same inputs with every intermediate tensor exposed: the FP32 graph as the
reference, the lowered graph through the low-precision emulation (exporter/lower/emulate.py), so the
values are the ones a GPU would store. Each node's error is the relative L2 distance of its
outputs from the FP32 tensors of the same name; what a node *adds* is its output error minus the
largest error already on its inputs. Candidates, strongest evidence first:

1. nodes where NaN/Inf first appears, or whose FP32 output exceeds the FP16 range (overflow);
2. the low-precision nodes that add the most error;
3. when the node that adds the most error is already FP32 (e.g. a subtraction that cancels a
   large offset: its inputs were rounded upstream, storage lost the signal before it ran), the
   low-precision nodes that produced its inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from exporter.lower.emulate import (
    LOW,
    emulation_model,
    load_full,
    run_with_intermediates,
    tensor_types,
    typed,
)
from exporter.lower.mixed import FP16_MAX


@dataclass
class Culprit:
    node: str
    op: str
    reason: str


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    g = np.asarray(got, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    if g.shape != r.shape:
        return float("inf")
    if not np.all(np.isfinite(g[np.isfinite(r)])):
        return float("inf")
    finite = np.isfinite(r)
    nr = float(np.linalg.norm(r[finite]))
    d = float(np.linalg.norm(g[finite] - r[finite]))
    return d / nr if nr > 0 else (0.0 if d == 0 else float("inf"))


def find_culprits(fp32_path: Path, lowered_path: Path, feeds: Mapping[str, np.ndarray], precision: str,
                  *, excluded: set[str], limit: int) -> list[Culprit]:
    """Up to `limit` low-precision nodes to keep in FP32 next, with the evidence for each: first the
    nodes where a value overflows FP16 or turns NaN/Inf, else the nodes that add the most error."""
    if limit <= 0:
        return []
    ev = _Evidence(fp32_path, lowered_path, feeds)
    first = ev.nonfinite_culprits(precision, excluded)
    if first:
        return first[:limit]
    return ev.error_culprits(precision, excluded, limit)


class _Evidence:
    """Both graphs run with every float intermediate exposed: the FP32 reference of each tensor
    (`ref`, through the Casts AutoCast inserted), the lowered graph's emulated value (`got`), and the
    relative error of each lowered tensor (`err`)."""

    def __init__(self, fp32_path: Path, lowered_path: Path, feeds: Mapping[str, np.ndarray]):
        fp32 = load_full(fp32_path)
        low = typed(load_full(lowered_path))
        self.low, self.low_types = low, tensor_types(low)
        self.fp32_names = {o for n in fp32.graph.node for o in n.output} | {i.name for i in fp32.graph.input}
        self.producer: dict[str, onnx.NodeProto] = {o: n for n in low.graph.node for o in n.output}
        self.float_low = [y for n in low.graph.node for y in n.output
                          if y and self.low_types.get(y) in LOW | {onnx.TensorProto.FLOAT} and self.origin(y) is not None]
        ref_names = sorted({self.origin(t) for t in self.float_low} - {i.name for i in fp32.graph.input})  # type: ignore[misc]
        self.ref = dict(feeds) | run_with_intermediates(fp32, feeds, ref_names)
        self.got = run_with_intermediates(emulation_model(low), feeds, self.float_low)
        self.err = {t: _rel(self.got[t], self.ref[self.origin(t)]) for t in self.float_low}  # type: ignore[index]
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in low.graph.node:
            for x in n.input:
                self.consumers.setdefault(x, []).append(n)

    def origin(self, t: str) -> str | None:
        """The FP32-graph tensor that `t` carries (through the Casts AutoCast inserted)."""
        seen = 0
        while t not in self.fp32_names and t in self.producer and self.producer[t].op_type == "Cast" and seen < 8:
            t, seen = self.producer[t].input[0], seen + 1
        return t if t in self.fp32_names else None

    def in_err(self, n: onnx.NodeProto) -> float:
        return max((self.err[x] for x in n.input if x in self.err), default=0.0)

    def computes_low(self, n: onnx.NodeProto) -> bool:
        return any(self.low_types.get(y) in LOW for y in n.output)

    def finite(self, t: str) -> bool:
        return t not in self.got or bool(np.all(np.isfinite(self.got[t])))

    def peak(self, t: str) -> float:
        r = self.ref[self.origin(t)]  # type: ignore[index]
        return float(np.nanmax(np.abs(r))) if np.size(r) else 0.0

    def nonfinite_culprits(self, precision: str, excluded: set[str]) -> list[Culprit]:
        """Nodes whose low-precision value overflows FP16 or is the first NaN/Inf."""
        first: dict[str, Culprit] = {}
        for t in self.float_low:
            if self.low_types.get(t) not in LOW:
                continue
            p = self.producer[t]
            overflow = precision == "fp16" and self.peak(t) > FP16_MAX
            new_nonfinite = not self.finite(t) and all(self.finite(x) for x in p.input if x in self.got or x in self.err)
            if not (overflow or new_nonfinite):
                continue
            what = (f"its value {self.peak(t):.3g} exceeds the FP16 maximum {FP16_MAX:g}" if overflow
                    else f"NaN/Inf first appears here in {precision}")
            if p.op_type == "Cast":
                # The value breaks when it is stored in low precision for the nodes that read it: those
                # nodes must run in FP32 so that the boundary cast disappears.
                for c in self.consumers.get(t, []):
                    if self.computes_low(c) and c.name not in excluded and c.name not in first:
                        first[c.name] = Culprit(c.name, c.op_type, f"its input {self.origin(t)}: {what}")
            elif p.name not in excluded and p.name not in first:
                first[p.name] = Culprit(p.name, p.op_type, what)
        return list(first.values())

    def error_culprits(self, precision: str, excluded: set[str], limit: int) -> list[Culprit]:
        """The low-precision nodes that add the most relative error (within half of the worst); where
        the worst is an FP32 node, the low-precision producers of its inputs."""
        err = self.err
        nodes = [n for n in self.low.graph.node
                 if n.op_type not in ("Cast", "Constant") and any(y in err for y in n.output)]
        added = sorted(((max(err[y] for y in n.output if y in err) - self.in_err(n), n) for n in nodes),
                       key=lambda t: -t[0])
        if not added or added[0][0] <= 0:
            return []
        top_gain, top = added[0]
        if not self.computes_low(top) or top.name in excluded:
            # The error shows up in an FP32 node: its inputs were already rounded. Blame their producers.
            ups = []
            for x in top.input:
                t = x
                while t in self.producer and self.producer[t].op_type == "Cast":
                    t = self.producer[t].input[0]
                p = self.producer.get(t)
                if p is not None and self.computes_low(p) and p.name not in excluded and p.op_type != "Constant":
                    ups.append(Culprit(p.name, p.op_type,
                                       f"its {precision} output feeds {top.name} ({top.op_type}), where the error grows "
                                       f"by {top_gain:.3g} even in FP32 (precision lost in storage)"))
            return ups[:limit]
        picks = [(g, n) for g, n in added
                 if self.computes_low(n) and n.name not in excluded and g >= 0.5 * top_gain][: min(4, limit)]
        return [Culprit(n.name, n.op_type, f"adds relative error {g:.3g} in {precision} (inputs {self.in_err(n):.3g})")
                for g, n in picks]
