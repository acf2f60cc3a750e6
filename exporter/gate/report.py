"""A self-contained HTML page for a parity report (no scripts, no external files): the verdict, the
metric table (cosine shown as 1 − cos in scientific notation, the other metrics with enough
significant digits to tell rows apart; parity.json keeps the full-precision numbers), per output a
histogram of log10|engine - reference| as inline SVG with the tolerance marked on it, the nodes a
FP16/BF16 build kept in FP32 and why (from the manifest's `precision` record, with the parity
fallback's rounds), and the tolerances. The layout reflows down to phone widths: a table wider
than the page scrolls inside its own box, the page itself never scrolls sideways."""

from __future__ import annotations

import html
import math
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from exporter.gate.parity import HIST_EDGES, OutputMetrics, ParityReport, Tolerance, one_minus_cos

KEEP_OPEN = 20  # a kept-in-FP32 table longer than this is collapsed (<details>)
_BAD = ' class="bad"'  # a failing row (shaded)

_CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;padding:1.5rem 2rem;color:#1d2430;max-width:1240px}
h1{font-size:1.4rem;margin:0 0 .3rem;overflow-wrap:anywhere} h2{font-size:1.1rem;margin-top:2rem}
.badge{display:inline-block;padding:.15rem .6rem;border-radius:.3rem;color:#fff;font-weight:600}
.passed{background:#1f8a4c}.failed{background:#c0392b}.not-checked{background:#7f8c8d}
.scroll{overflow-x:auto;max-width:100%;margin:.5rem 0}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
td,th{border:1px solid #d5dae1;padding:.25rem .4rem;text-align:right;white-space:nowrap;vertical-align:top}
th{background:#f2f4f7} td.l,th.l{text-align:left} td.w{white-space:normal;min-width:6rem} td.any{overflow-wrap:anywhere}
td.verdict{white-space:normal;text-align:left;min-width:6rem;max-width:22rem} tr.bad td.verdict{min-width:12rem}
tr.bad td{background:#fdecea} td.over{color:#b42318;font-weight:600} .muted{color:#667085}
.pill{display:inline-block;padding:0 .4rem;border-radius:.25rem;color:#fff;font-weight:600;font-size:.85em}
.pill.ok{background:#1f8a4c}.pill.no{background:#c0392b}
.hists{display:flex;flex-wrap:wrap;gap:1.2rem} figure{margin:0;flex:0 1 460px;min-width:0}
figcaption{font-weight:600;overflow-wrap:anywhere} figure svg{display:block;max-width:100%;height:auto}
details summary{cursor:pointer;margin:.4rem 0}
@media (max-width:1100px){body{padding:1.25rem 1rem}} @media (max-width:640px){body{padding:.75rem}}
"""


# -- numbers ------------------------------------------------------------------------------------------
def _num(v: Any) -> str:
    """A metric: 3 significant digits, in scientific notation below 0.01 and from 1e4 on."""
    if v is None:
        return "–"
    if isinstance(v, bool) or not isinstance(v, float):
        return html.escape(str(v))
    if v == 0:
        return "0"
    if not math.isfinite(v):
        return str(v)
    return f"{v:.2e}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.3g}"


def _fraction(v: float | None) -> str:
    """A fraction of rows/elements: never rounded up to 1 (0.99999 shows as 0.99999, not 1)."""
    if v is None:
        return "–"
    if v == 1:
        return "1"
    digits = 4
    while digits < 9 and round(v, digits) >= 1:
        digits += 1
    return f"{v:.{digits}f}"


def _limit(v: float | None) -> str:
    """A tolerance as given (0.99999 stays 0.99999)."""
    return "–" if v is None else f"{v:.10g}"


# -- histograms ---------------------------------------------------------------------------------------
def tolerance_marker(report: ParityReport, name: str) -> tuple[float, str] | None:
    """Where output `name`'s tolerance lies on its |error| axis, and what it is: the max_abs tolerance
    when the policy gates it; else the rel_l2 one, placed where the output's largest error would lie
    if every error grew by the same factor until rel L2 reached its limit (the tightest case's), so
    the distance from the bars to the line is the headroom. None when neither applies (no rel_l2
    tolerance, or no error to scale)."""
    tol = report.policy.for_output(name)
    if tol.max_abs is not None:
        return tol.max_abs, f"max abs ≤ {tol.max_abs:g}"
    if tol.rel_l2 is None:
        return None
    scaled = [o.max_abs * tol.rel_l2 / o.rel_l2 for c in report.cases for o in c.outputs
              if o.name == name and o.max_abs > 0 and 0 < o.rel_l2 < math.inf]
    if not scaled:
        return None
    return min(scaled), (f"rel L2 ≤ {tol.rel_l2:g}: the largest error, were every error scaled until "
                         "rel L2 reaches its limit")


def _marker_svg(value: float, what: str, x_of: Callable[[float], float], top: float, bottom: float, width: int) -> str:
    lo, hi = float(HIST_EDGES[0]), float(HIST_EDGES[-1])
    lg = math.log10(value) if value > 0 else lo
    x = x_of(min(max(lg, lo), hi))
    beyond = "≥ " if lg > hi else "≤ " if lg < lo else ""
    right = x > width * 0.62
    label = f"{beyond}tolerance {value:.2g}"
    return (f'<g class="tolerance" data-value="{value!r}"><title>tolerance: {html.escape(what)} '
            f'(|err| = {value:.3g})</title>'
            f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="#d92d20" stroke-width="1.5" '
            f'stroke-dasharray="4 3"/><text x="{x + (-4 if right else 4):.1f}" y="{top + 9}" font-size="10" '
            f'fill="#b42318" text-anchor="{"end" if right else "start"}">{label}</text></g>')


def _histogram_svg(counts: list[int], zero: int, marker: tuple[float, str] | None = None,
                   width: int = 460, height: int = 150) -> str:
    bins = len(counts)
    top = max(max(counts, default=0), zero, 1)
    pad_l, pad_b = 34, 28
    bw = (width - pad_l - 10) / (bins + 1)
    step = float(HIST_EDGES[1] - HIST_EDGES[0])
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" role="img">']
    parts.append(f'<line x1="{pad_l}" y1="{height - pad_b}" x2="{width - 5}" y2="{height - pad_b}" stroke="#98a2b3"/>')
    bars = [("0", zero, "#98a2b3")] + [(f"{HIST_EDGES[i]:g}", c, "#3366cc") for i, c in enumerate(counts)]
    for i, (label, c, color) in enumerate(bars):
        h = (height - pad_b - 18) * c / top  # the top strip holds the count and the tolerance's label
        x = pad_l + i * bw
        parts.append(f'<rect x="{x + 1:.1f}" y="{height - pad_b - h:.1f}" width="{bw - 2:.1f}" height="{h:.1f}" fill="{color}">'
                     f"<title>{'exact 0' if i == 0 else '1e' + label + ' ≤ |err| < 1e' + f'{float(label) + step:g}'}: {c}</title></rect>")
        if i == 0 or (i > 1 and (i - 1) % 4 == 0):  # the zero bucket, then every 2 decades
            parts.append(f'<text x="{x + bw / 2:.1f}" y="{height - pad_b + 14}" font-size="10" text-anchor="middle" '
                         f'fill="#475467">{"0" if i == 0 else "1e" + label}</text>')
    if marker is not None:
        def x_of(lg: float) -> float:  # the left edge of bar 1 is HIST_EDGES[0]
            return pad_l + (1 + (lg - float(HIST_EDGES[0])) / step) * bw

        parts.append(_marker_svg(marker[0], marker[1], x_of, 3, height - pad_b, width))
    parts.append(f'<text x="4" y="12" font-size="10" fill="#475467">{top}</text>')
    parts.append(f'<text x="{width / 2:.0f}" y="{height - 2}" font-size="10" text-anchor="middle" fill="#475467">'
                 "|engine − reference| (log scale)</text></svg>")
    return "".join(parts)


def _histograms(report: ParityReport) -> str:
    totals: dict[str, tuple[list[int], int]] = {}
    for case in report.cases:
        for o in case.outputs:
            counts, zero = totals.get(o.name, ([0] * (len(HIST_EDGES) - 1), 0))
            if o.histogram:
                counts = [a + b for a, b in zip(counts, o.histogram)]
            totals[o.name] = (counts, zero + o.exact_zero)
    figures = []
    for name, (c, z) in totals.items():
        marker = tolerance_marker(report, name)
        why = "" if marker else ('<div class="muted">no tolerance line: no absolute or rel L2 tolerance, '
                                 "or no error to scale</div>")
        figures.append(f"<figure><figcaption>{html.escape(name)}</figcaption>{_histogram_svg(c, z, marker)}{why}</figure>")
    return "".join(figures)


# -- tables -------------------------------------------------------------------------------------------
def _table(head: str, rows: str, cls: str) -> str:
    """A table in its own horizontally scrolling box: a wide table never widens the page."""
    return f'<div class="scroll"><table class="{cls}">{f"<tr>{head}</tr>" if head else ""}{rows}</table></div>'


def _over(o: OutputMetrics, tol: Tolerance) -> set[str]:
    """The metrics of `o` outside `tol` (highlighted in the table)."""
    out = set()
    for key, value, limit, is_max in [("max_abs", o.max_abs, tol.max_abs, True), ("rel_l2", o.rel_l2, tol.rel_l2, True),
                                      ("cosine", o.cosine, tol.cosine, False), ("argmax", o.argmax, tol.argmax, False),
                                      ("equal", o.equal, tol.equal, False)]:
        if value is not None and limit is not None and (value > limit if is_max else value < limit):
            out.add(key)
    return out


def _verdict(failures: list[str]) -> str:
    """pass, or fail with every failure (parity.py words a cosine failure as 1 − cos, like the table)."""
    if not failures:
        return '<td class="verdict"><span class="pill ok">pass</span></td>'
    return '<td class="verdict"><span class="pill no">fail</span> ' + "<br>".join(html.escape(f) for f in failures) + "</td>"


def _metrics_table(report: ParityReport) -> str:
    """One row per case and output. argmax (logits outputs) and equal (integer outputs) are left out
    where no output has them (an empty column would only take width from the verdict's)."""
    outputs = [o for c in report.cases for o in c.outputs]
    extra = [k for k in ("argmax", "equal") if any(getattr(o, k) is not None for o in outputs)]
    rows = []
    for case in report.cases:
        for o in case.outputs:
            over = _over(o, report.policy.for_output(o.name))
            cells = [("max_abs", _num(o.max_abs)), ("max_rel", _num(o.max_rel)), ("rel_l2", _num(o.rel_l2)),
                     ("cosine", one_minus_cos(o.cosine, digits=2)), *[(k, _fraction(getattr(o, k))) for k in extra],
                     ("nan", f"{o.nan}/{o.inf}")]
            rows.append(
                f"<tr{'' if o.passed else _BAD}><td class='l w'>{html.escape(case.label)}</td>"
                f"<td class='l'>{html.escape(o.name)}</td><td class='l'>{html.escape(str(o.shape))}</td>"
                + "".join(f"<td{' class=over' if k in over else ''}>{text}</td>" for k, text in cells)
                + f"{_verdict(o.failures)}</tr>"
            )
    head = ("<th class='l'>case</th><th class='l'>output</th><th class='l'>shape</th><th>max abs</th><th>max rel</th>"
            "<th>rel L2</th><th title='1 − cosine similarity: 0 is the same direction'>1 − cos</th>"
            + "".join(f"<th>{k}</th>" for k in extra) + "<th>NaN/Inf</th><th class='l verdict'>verdict</th>")
    return _table(head, "".join(rows), "metrics")


def _checks_table(report: ParityReport) -> str:
    """Task-level checks (detections matched by IoU, zero-shot rankings), when the gate ran any."""
    rows = "".join(
        f"<tr{'' if k.passed else _BAD}><td class='l w'>{html.escape(c.label)}</td><td class='l'>"
        f"{html.escape(k.name)}</td><td class='l w'>"
        + ", ".join(f"{html.escape(m)} {_num(float(v))}" for m, v in k.metrics.items())
        + f"</td>{_verdict(k.failures)}</tr>"
        for c in report.cases for k in c.checks
    )
    if not rows:
        return ""
    head = "<th class='l'>case</th><th class='l'>check</th><th class='l'>metrics</th><th class='l verdict'>verdict</th>"
    return "<h2>Task checks</h2>" + _table(head, rows, "checks")


def _tolerance_table(report: ParityReport) -> str:
    policy = report.policy.to_dict()
    names = {"max_abs": "max abs ≤", "rel_l2": "rel L2 ≤", "cosine": "cosine ≥ (1 − cos ≤)", "argmax": "argmax ≥",
             "equal": "equal ≥"}

    def cell(key: str, v: float | None) -> str:
        if key == "cosine" and v is not None:
            return f"<td>{_limit(v)} ({1 - v:.2g})</td>"
        return f"<td>{_limit(v)}</td>"

    rows = "".join(
        f"<tr><td class='l w'>{html.escape(k)}</td>" + "".join(cell(m, v) for m, v in t.items()) + "</tr>"
        for k, t in [("all outputs", policy["default"])] + list(policy["per_output"].items())
    )
    head = "<th class='l'>scope</th>" + "".join(f"<th>{names.get(k, html.escape(k))}</th>" for k in policy["default"])
    return "<h2>Tolerances</h2>" + _table(head, rows, "tolerances") + (
        '<p class="muted">– not gated. Per output, its own entries replace those of all outputs.</p>')


# -- nodes kept in FP32 -------------------------------------------------------------------------------
def _realised_parts(precision: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(part, realised record) of each lowered graph: one for most bundles; per tower for zero-shot
    (`parts`), per graph (prefill, decode) for generation bundles."""
    if isinstance(precision.get("parts"), Mapping):
        return [(f"{role}/{sub}" if sub else str(role), r) for role, p in precision["parts"].items()
                if isinstance(p, Mapping) for sub, r in _realised_parts(p)]
    realised = precision.get("realised") or {}
    nested = [(str(k), v) for k, v in realised.items() if isinstance(v, Mapping) and "fp32_nodes" in v]
    return nested if nested and "fp32_nodes" not in realised else [("", realised)]


def _fallback_rounds(history: Any) -> str:
    items = []
    for h in history if isinstance(history, list) else []:
        kept = [f"{k.get('node')} ({k.get('op')})" for k in h.get("kept_fp32", [])] + [
            f"op type {op}" for op in h.get("kept_fp32_ops", [])] + [
            f"the inputs of every {op} (cast to FP32 at the node)" for op in h.get("cast_inputs_ops", [])]
        failed = "; ".join(h.get("failures", [])[:3])
        text = (f"round {h.get('round')}: {'gate failed on ' + failed + '. ' if failed else ''}"
                + (f"kept in FP32: {', '.join(kept)}." if kept else "")
                + (f" Stopped: {h['stopped']}." if h.get("stopped") else ""))
        items.append(f"<li>{html.escape(text)}</li>")
    return f"<p>Parity fallback</p><ol>{''.join(items)}</ol>" if items else ""


def kept_fp32_section(precision: Mapping[str, Any] | None) -> str:
    """The "Kept in FP32" section: every node of a FP16/BF16 graph that computes in FP32, with its op
    type and the reason (AutoCast's range rules, --fp32-nodes/--fp32-ops, the parity fallback), from
    the manifest's `precision` record. A line for FP32 builds; nothing for other precisions, or
    without a record."""
    if not precision:
        return ""
    requested = str(precision.get("requested", ""))
    if requested == "fp32":
        return '<h2>Kept in FP32</h2><section class="kept"><p class="muted">none (fp32 build)</p></section>'
    if requested not in ("fp16", "bf16"):
        return ""
    parts = _realised_parts(precision)
    rows, lines = [], []
    for part, realised in parts:
        nodes = realised.get("fp32_nodes")
        if nodes is None:
            lines.append(f"{part + ': ' if part else ''}not recorded"
                         + (f" (the graph was lowered to {requested} before this build)" if realised.get("lowered_before") else ""))
            continue
        dtypes = ", ".join(f"{n} {d}" for d, n in (realised.get("nodes_by_dtype") or {}).items())
        lines.append(f"{part + ': ' if part else ''}{len(nodes)} node(s) kept in FP32"
                     + (f" (nodes by compute dtype: {dtypes}; {realised.get('cast_nodes', 0)} Cast)" if dtypes else ""))
        rows += [(part, n) for n in nodes]
    show_part = any(p for p, _ in rows)
    body = "".join(
        "<tr>" + (f"<td class='l'>{html.escape(p)}</td>" if show_part else "")
        + f"<td class='l'>{html.escape(str(n.get('node', '')))}</td><td class='l'>{html.escape(str(n.get('op', '')))}</td>"
        f"<td class='l w any'>{html.escape(str(n.get('reason', '')))}</td></tr>"
        for p, n in rows
    )
    head = ("<th class='l'>part</th>" if show_part else "") + "<th class='l'>node</th><th class='l'>op</th><th class='l'>reason</th>"
    table = _table(head, body, "kept-fp32") if rows else ""
    if len(rows) > KEEP_OPEN:
        ops = ", ".join(f"{op} ×{k}" for op, k in Counter(str(n.get("op")) for _, n in rows).most_common())
        table = f"<details><summary>{len(rows)} nodes kept in FP32: {html.escape(ops)}</summary>{table}</details>"
    summary = "".join(f"<p>{html.escape(line)}</p>" for line in lines)
    return f'<h2>Kept in FP32</h2><section class="kept">{summary}{table}{_fallback_rounds(precision.get("fallback"))}</section>'


# -- the page -----------------------------------------------------------------------------------------
def render_html(report: ParityReport, *, title: str, context: dict[str, Any] | None = None,
                precision: Mapping[str, Any] | None = None) -> str:
    """The page. context: key/value lines shown under the title (source, target, ...); precision:
    the manifest's `precision` record (requested, realised, fallback), for the kept-in-FP32 section."""
    ctx = "".join(f"<tr><td class='l'>{html.escape(str(k))}</td><td class='l w any'>{html.escape(str(v))}</td></tr>"
                  for k, v in (context or {}).items())
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report.notes)
    total = sum(len(c.outputs) + len(c.checks) for c in report.cases)
    failing = len(report.failures())
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title>
<style>{_CSS}</style></head><body>
<h1>{html.escape(title)} <span class="badge {report.status}" id="verdict">{report.status}</span></h1>
<p class="muted">precision {html.escape(str(report.precision))} · {len(report.cases)} input case(s) ·
{f"{failing} of {total} failing (shaded)" if failing else "failing outputs are shaded"}</p>
{_table("", ctx, "context") if ctx else ""}
{f"<ul>{notes}</ul>" if notes else ""}
<h2>Metrics</h2>{_metrics_table(report)}
{_checks_table(report)}
<h2>Error distribution per output (all cases)</h2><div class="hists">{_histograms(report)}</div>
{kept_fp32_section(precision)}
{_tolerance_table(report)}
</body></html>
"""


def write_html(report: ParityReport, path: Path, *, title: str, context: dict[str, Any] | None = None,
               precision: Mapping[str, Any] | None = None) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_html(report, title=title, context=context, precision=precision), encoding="utf-8")
    tmp.replace(path)
    return path
