"""The parity gate (numpy only): does the engine compute what the reference computes?

One module serves `enginekit build` (the gate), `enginekit parity`, the tests and the bench.
Per output it measures max-abs, max-rel, relative L2, cosine, NaN/Inf counts, argmax agreement
(for logits) and exact agreement (for integer outputs); a tolerance policy per precision decides
pass/fail, overridable per output. A report is true when every output of every case passes, and
it lists every failure at once.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from runtimes.errors import UsageError

# log10(|error|) histogram bins for the HTML report: 1e-12 .. 1e+2, plus an exact-zero bucket.
HIST_EDGES = np.arange(-12.0, 2.5, 0.5)


@dataclass(frozen=True)
class Tolerance:
    """Thresholds; None means not gated. rel_l2/max_abs are maxima, cosine/argmax/equal minima."""

    max_abs: float | None = None
    rel_l2: float | None = None
    cosine: float | None = None
    argmax: float | None = None  # fraction of rows whose argmax (last axis) agrees; outputs named logits*
    equal: float | None = None  # fraction of equal elements; integer and bool outputs
    # 1: an output whose reference is the same value everywhere, in every case, may pass. By default it fails:
    # an engine that returns that constant (a broken graph, all zeros) would match it, so the gate proves nothing.
    allow_constant: float | None = None

    def merged(self, other: Tolerance) -> Tolerance:
        return replace(self, **{f.name: getattr(other, f.name) for f in fields(other) if getattr(other, f.name) is not None})


# Defaults by precision. FP32 engines differ from torch only by kernel order (rel-L2 ~1e-6 on
# the tests' models); reduced precisions are gated on direction and relative energy of the error.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(rel_l2=1e-4, cosine=0.99999, argmax=0.99, equal=1.0),
    "fp16": Tolerance(rel_l2=1e-2, cosine=0.9995, argmax=0.98, equal=0.99),
    "bf16": Tolerance(rel_l2=3e-2, cosine=0.999, argmax=0.97, equal=0.99),
    "int8": Tolerance(rel_l2=0.15, cosine=0.99, argmax=0.95, equal=0.95),
    "fp8": Tolerance(rel_l2=0.15, cosine=0.99, argmax=0.95, equal=0.95),
    # weight-only INT4 of causal LMs (16 levels per block of 32 weights): a tiny random Qwen2's teacher-forced
    # logits measured rel-L2 0.12 and 1 − cos 7e-3 against FP32 (tests/exporter/recipes/test_genai.py)
    "int4": Tolerance(rel_l2=0.25, cosine=0.98, argmax=0.9, equal=0.9),
}


@dataclass
class TolerancePolicy:
    default: Tolerance
    per_output: dict[str, Tolerance] = field(default_factory=dict)

    def for_output(self, name: str) -> Tolerance:
        return self.default.merged(self.per_output[name]) if name in self.per_output else self.default

    @classmethod
    def for_precision(cls, precision: str, overrides: Sequence[str] = ()) -> TolerancePolicy:
        policy = cls(DEFAULT_TOLERANCES.get(precision, DEFAULT_TOLERANCES["fp32"]))
        for text in overrides:
            name, tol = parse_tolerance(text)
            if name is None:
                policy.default = policy.default.merged(tol)
            else:
                policy.per_output[name] = policy.per_output.get(name, Tolerance()).merged(tol)
        return policy

    def to_dict(self) -> dict[str, Any]:
        return {"default": asdict(self.default), "per_output": {k: asdict(v) for k, v in self.per_output.items()}}


_TOL = re.compile(r"^(?:(?P<out>[^:=,]+):)?(?P<pairs>[a-z_0-9]+=[^,]+(?:,[a-z_0-9]+=[^,]+)*)$")


def parse_tolerance(text: str) -> tuple[str | None, Tolerance]:
    """'rel_l2=1e-3' (all outputs) or 'logits:argmax=0.95,cosine=0.999' (one output)."""
    m = _TOL.match(text.strip())
    names = [f.name for f in fields(Tolerance)]
    if not m:
        raise UsageError(
            f"Expected --tolerance as [OUTPUT:]METRIC=VALUE[,METRIC=VALUE] with METRIC in {names}, found "
            f"'{text}'. Example: --tolerance logits:argmax=0.95 or --tolerance rel_l2=1e-3."
        )
    values: dict[str, float] = {}
    for pair in m.group("pairs").split(","):
        key, _, val = pair.partition("=")
        if key not in names:
            raise UsageError(f"Unknown tolerance metric '{key}' in '{text}'; expected one of {names}.")
        values[key] = tolerance_value(key, val, text, signed=key == "cosine")
    return m.group("out"), Tolerance(**values)


def tolerance_value(key: str, val: str, text: str, *, signed: bool = False) -> float:
    """The number of one METRIC=VALUE of --tolerance `text`: finite, and >= 0 unless `signed` (cosine,
    whose range is [-1, 1]; a value above 1 is allowed: it forces a failure, which tests use). NaN would
    switch the check off: every comparison with NaN is false, so `max_abs > nan` never fails."""
    try:
        value = float(val)
    except ValueError:
        raise UsageError(f"Expected a number for '{key}' in --tolerance '{text}', found '{val}'.") from None
    if not math.isfinite(value) or (value < 0 and not signed):
        raise UsageError(
            f"Expected a finite{'' if signed else ', non-negative'} number for '{key}' in --tolerance '{text}', found "
            f"'{val}': a NaN, infinite{'' if signed else ' or negative'} tolerance decides the check whatever the "
            f"engine computes (NaN passes everything). Give a number such as {key}=1e-3, or drop '{key}' to keep its "
            "default."
        )
    return value


@dataclass
class OutputMetrics:
    name: str
    shape: list[int]
    ref_shape: list[int]
    max_abs: float = 0.0
    mean_abs: float = 0.0
    max_rel: float = 0.0
    rel_l2: float = 0.0
    cosine: float = 1.0
    argmax: float | None = None  # tie-aware agreement (gated): see compare_output
    argmax_raw: float | None = None  # plain fraction of rows whose argmax agrees
    argmax_ties: int = 0  # disagreeing rows whose reference margin is within the row's own error
    equal: float | None = None
    masked: int = 0  # positions left out of the metrics: padding by the case's attention_mask
    nan: int = 0  # in the engine's output
    inf: int = 0
    ref_nonfinite: int = 0  # NaN/Inf already in the reference: compared on finite positions only
    histogram: list[int] = field(default_factory=list)  # counts per HIST_EDGES bin of log10|error|
    exact_zero: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class TaskCheck:
    """A task-level comparison of one case (what users look at, not one tensor): detections matched
    by IoU (exporter/gate/detection.py), zero-shot rankings (exporter/gate/task.py). `metrics` holds
    numbers, `failures` the gated ones that missed their threshold."""

    name: str
    metrics: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class CaseReport:
    label: str
    input_shapes: dict[str, list[int]]
    outputs: list[OutputMetrics]
    checks: list[TaskCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs) and all(c.passed for c in self.checks)


@dataclass
class ParityReport:
    precision: str
    policy: TolerancePolicy
    cases: list[CaseReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    status: str = ""  # "passed" | "failed" | "not-checked" (set by finish())

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def __bool__(self) -> bool:
        return self.passed

    def finish(self, engine_checked: bool = True) -> ParityReport:
        """passed: the engine ran here and every case passed. failed: any case failed (emulated
        ones included). not-checked: the engine could not run here, whatever else was shown."""
        if any(not c.passed for c in self.cases):
            self.status = "failed"
        elif not self.cases or not engine_checked:
            self.status = "not-checked"
        else:
            self.status = "passed"
        return self

    def failures(self) -> list[str]:
        return [f"{c.label}/{o.name}: {'; '.join(o.failures)}" for c in self.cases for o in [*c.outputs, *c.checks]
                if o.failures]

    def worst_checks(self) -> dict[str, dict[str, float]]:
        """Per task check, the worst value of each metric over all cases (the lowest, or the highest for
        *delta* metrics); counts (*_count, missing, extra, borderline) are summed."""
        out: dict[str, dict[str, float]] = {}
        for c in self.cases:
            for chk in c.checks:
                w = out.setdefault(chk.name, {})
                for k, v in chk.metrics.items():
                    if k.endswith("_count") or k in ("missing", "extra", "borderline"):
                        w[k] = w.get(k, 0.0) + v  # totals over the cases
                    elif k not in w:
                        w[k] = v
                    else:
                        w[k] = max(w[k], v) if "delta" in k else min(w[k], v)
        return out

    def worst(self) -> dict[str, dict[str, float]]:
        """Per output, the worst value of each metric over all cases."""
        out: dict[str, dict[str, float]] = {}
        for c in self.cases:
            for o in c.outputs:
                w = out.setdefault(o.name, {"max_abs": 0.0, "rel_l2": 0.0, "cosine": 1.0})
                w["max_abs"] = max(w["max_abs"], o.max_abs)
                w["rel_l2"] = max(w["rel_l2"], o.rel_l2)
                w["cosine"] = min(w["cosine"], o.cosine)
                if o.argmax is not None:
                    w["argmax"] = min(w.get("argmax", 1.0), o.argmax)
                if o.equal is not None:
                    w["equal"] = min(w.get("equal", 1.0), o.equal)
                w["nan_inf"] = w.get("nan_inf", 0) + o.nan + o.inf
        return out

    def summary(self) -> dict[str, Any]:
        """The short form kept in the manifest."""
        return {
            "status": self.status,
            "precision": self.precision,
            "cases": [c.label for c in self.cases],
            "worst": self.worst(),
            **({"checks": self.worst_checks()} if any(c.checks for c in self.cases) else {}),
            "failures": self.failures(),
            "notes": list(self.notes),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "precision": self.precision,
            "tolerances": self.policy.to_dict(),
            "histogram_edges_log10": HIST_EDGES.tolist(),
            "cases": [
                {"label": c.label, "passed": c.passed, "input_shapes": c.input_shapes,
                 "outputs": [asdict(o) | {"passed": o.passed} for o in c.outputs],
                 **({"checks": [asdict(k) | {"passed": k.passed} for k in c.checks]} if c.checks else {})}
                for c in self.cases
            ],
            "failures": self.failures(),
            "notes": self.notes,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_json_default)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o).__name__)


def _finite_float(x: float) -> float:
    return float(x) if math.isfinite(x) else float("inf")


def compare_output(name: str, ref: np.ndarray, got: np.ndarray, tol: Tolerance) -> OutputMetrics:
    """Metrics and pass/fail of one output."""
    ref = np.asarray(ref)
    got = np.asarray(got)
    m = OutputMetrics(name, list(got.shape), list(ref.shape))
    if ref.shape != got.shape:
        m.failures.append(f"shape {list(got.shape)} differs from the reference {list(ref.shape)}")
        return m
    if ref.dtype.kind in "biu" or ref.dtype == np.bool_:
        m.equal = float(np.mean(ref == got)) if ref.size else 1.0
        m.max_abs = float(np.max(np.abs(ref.astype(np.int64) - got.astype(np.int64)))) if ref.size else 0.0
        if tol.equal is not None and m.equal < tol.equal:
            m.failures.append(f"equal {m.equal:.4f} < {tol.equal}")
        return m
    r = ref.astype(np.float64)
    g = got.astype(np.float64)
    m.nan = int(np.isnan(g).sum())
    m.inf = int(np.isinf(g).sum())
    ref_ok = np.isfinite(r)
    m.ref_nonfinite = int((~ref_ok).sum())
    ok = ref_ok & np.isfinite(g)
    new_nonfinite = int((ref_ok & ~np.isfinite(g)).sum())
    if new_nonfinite:
        m.failures.append(f"{new_nonfinite} NaN/Inf value(s) where the reference is finite (NaN {m.nan}, Inf {m.inf})")
    d = np.abs(g[ok] - r[ok])
    rv, gv = r[ok], g[ok]
    if d.size:
        m.max_abs = float(d.max())
        m.mean_abs = float(d.mean())
        scale = float(np.abs(rv).max())
        m.max_rel = float((d / (np.abs(rv) + 1e-6 * max(scale, 1e-30))).max())
        nref = float(np.linalg.norm(rv))
        m.rel_l2 = _finite_float(float(np.linalg.norm(gv - rv)) / nref) if nref > 0 else (0.0 if m.max_abs == 0 else float("inf"))
        ng = float(np.linalg.norm(gv))
        if nref > 0 and ng > 0:
            m.cosine = float(np.clip(np.dot(rv, gv) / (nref * ng), -1.0, 1.0))
        else:
            m.cosine = 1.0 if nref == ng else 0.0
        nz = d[d > 0]
        m.exact_zero = int(d.size - nz.size)
        m.histogram = np.histogram(np.clip(np.log10(nz), HIST_EDGES[0], HIST_EDGES[-1] - 1e-9), bins=HIST_EDGES)[0].tolist() if nz.size else [0] * (len(HIST_EDGES) - 1)
    if name.startswith("logits") and ref.ndim >= 1 and ref.shape[-1] > 1 and ref.size:
        # A flip between two classes whose reference scores differ by less than the output's
        # typical numerical error (3x the 90th percentile of |error|) is a tie, not a wrong answer
        # (random-weight models are full of them); such rows count as agreeing and are reported.
        rr = np.nan_to_num(r, nan=-np.inf).reshape(-1, ref.shape[-1])
        gg = np.nan_to_num(g, nan=-np.inf).reshape(-1, ref.shape[-1])
        a, b = rr.argmax(-1), gg.argmax(-1)
        rows = np.arange(len(a))
        noise = 3 * float(np.percentile(d, 90)) if d.size else 0.0
        tie = (a != b) & (rr[rows, a] - rr[rows, b] <= noise) & np.isfinite(gg[rows, b])
        m.argmax_raw = float(np.mean(a == b))
        m.argmax_ties = int(tie.sum())
        m.argmax = float(np.mean((a == b) | tie))
        if tol.argmax is not None and m.argmax < tol.argmax:
            m.failures.append(f"argmax agreement {m.argmax:.4f} < {tol.argmax} ({int((a != b).sum() - tie.sum())} rows "
                              f"flipped beyond noise, {m.argmax_ties} ties)")
    if tol.max_abs is not None and m.max_abs > tol.max_abs:
        m.failures.append(f"max_abs {m.max_abs:.3g} > {tol.max_abs:g}")
    if tol.rel_l2 is not None and m.rel_l2 > tol.rel_l2:
        m.failures.append(f"rel_l2 {m.rel_l2:.3g} > {tol.rel_l2:g}")
    if tol.cosine is not None and m.cosine < tol.cosine:
        # in 1 − cos terms: a failing cosine of 0.99999987 would print as 1.000000 at 6 decimals
        m.failures.append(f"1 − cos {one_minus_cos(m.cosine)} > {1 - tol.cosine:.2g} (cosine ≥ {tol.cosine} required)")
    return m


def compare_case(label: str, feeds: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                 candidate: Mapping[str, np.ndarray], policy: TolerancePolicy) -> CaseReport:
    """Every output of one case. Where the feeds hold an attention_mask (batch, sequence) and an output
    has those leading dims, padded positions (mask 0) are left out: what a model computes there is
    unspecified (ModernBERT's unpadded attention leaves them at other values than torch's), and the
    number left out is recorded per output."""
    mask = _padding_mask(feeds)
    outputs = []
    for name, ref in reference.items():
        if name not in candidate:
            m = OutputMetrics(name, [], list(np.shape(ref)), failures=["missing from the engine's outputs"])
        else:
            got = candidate[name]
            keep = mask if mask is not None and np.shape(ref)[:2] == mask.shape == np.shape(got)[:2] else None
            if keep is not None and not keep.all():
                m = compare_output(name, np.asarray(ref)[keep], np.asarray(got)[keep], policy.for_output(name))
                m.shape, m.ref_shape, m.masked = list(np.shape(got)), list(np.shape(ref)), int((~keep).sum())
            else:
                m = compare_output(name, ref, got, policy.for_output(name))
        outputs.append(m)
    return CaseReport(label, {k: list(np.shape(v)) for k, v in feeds.items()}, outputs)


def _padding_mask(feeds: Mapping[str, np.ndarray]) -> np.ndarray | None:
    mask = feeds.get("attention_mask")
    if mask is None or np.ndim(mask) != 2:
        return None
    return np.asarray(mask) != 0


@dataclass
class ConstantWatch:
    """Whether each floating-point reference output has held one value everywhere so far: (that value, the
    cases seen, the elements seen), or None once it varied. Kept per case, so no reference is held."""

    seen: dict[str, tuple[float, int, int] | None] = field(default_factory=dict)

    def add(self, name: str, value: Any) -> None:
        arr = np.asarray(value)
        if arr.dtype.kind != "f" or not arr.size or self.seen.get(name, ()) is None:
            return
        first = float(arr.flat[0]) if name not in self.seen else self.seen[name][0]  # type: ignore[index]
        if not np.all(arr == first):
            self.seen[name] = None
            return
        cases, elements = self.seen[name][1:] if name in self.seen else (0, 0)  # type: ignore[index]
        self.seen[name] = (first, cases + 1, elements + arr.size)


def check_constant_references(report: ParityReport, watch: ConstantWatch) -> None:
    """Fail every floating-point output whose reference held one value everywhere over all cases (more than
    one element), unless its tolerance has allow_constant=1: a broken engine returning that value would pass
    (a model whose outputs were exactly 0 for every input passed with cosine 1.0)."""
    for name, seen in watch.seen.items():
        if seen is None or seen[2] < 2:
            continue
        value, cases, _ = seen
        if report.policy.for_output(name).allow_constant:
            report.notes.append(f"'{name}': the reference is {value:g} everywhere in all {cases} cases, so the "
                                "gate proves nothing about it; allowed by --tolerance allow_constant=1")
            continue
        target = next((o for c in report.cases for o in c.outputs if o.name == name), None)
        if target is not None:
            target.failures.append(
                f"the reference is {value:g} everywhere in all {cases} cases: an engine returning {value:g} "
                f"would pass, so the gate cannot tell it from a broken one (check the model and its inputs; "
                f"--tolerance {name}:allow_constant=1 accepts it)")


def one_minus_cos(cosine: float, digits: int = 3) -> str:
    """1 − cosine in scientific notation with `digits` significant digits (`3.1e-08` for 2); exactly 0 as
    `0`. Cosines of a passing gate all print as 1.000000 at fixed decimals."""
    gap = 1.0 - float(cosine)
    return "0" if gap == 0 else f"{gap:.{digits - 1}e}"


def format_failures(report: ParityReport, limit: int = 2) -> str:
    """The first `limit` failures (case/output: what exceeded its tolerance) and how many more there are:
    short enough for one terminal paragraph; report.html and parity.json list them all."""
    items = report.failures()
    text = "; ".join(items[:limit])
    failed = {c.label for c in report.cases if any(o.failures for o in [*c.outputs, *c.checks])}
    more = f"; and {len(items) - limit} more" if len(items) > limit else ""
    return f"{text}{more} ({len(failed)} of {len(report.cases)} cases failed)"
