"""A self-contained HTML page for a parity report: verdict, metric tables and, per output, a
histogram of log10|engine - reference| as inline SVG (no scripts, no external files)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from exporter.gate.parity import HIST_EDGES, ParityReport

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem;color:#1d2430;max-width:1100px}
h1{font-size:1.4rem;margin:0 0 .3rem} h2{font-size:1.1rem;margin-top:2rem}
.badge{display:inline-block;padding:.15rem .6rem;border-radius:.3rem;color:#fff;font-weight:600}
.passed{background:#1f8a4c}.failed{background:#c0392b}.not-checked{background:#7f8c8d}
table{border-collapse:collapse;margin:.5rem 0;font-variant-numeric:tabular-nums}
td,th{border:1px solid #d5dae1;padding:.25rem .55rem;text-align:right;white-space:nowrap} th{background:#f2f4f7}
td.l,th.l{text-align:left} tr.bad td{background:#fdecea} .muted{color:#667085}
.hists{display:flex;flex-wrap:wrap;gap:1.2rem} figure{margin:0} figcaption{font-weight:600}
"""


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.6f}" if 0.01 <= abs(v) <= 1.0 else f"{v:.3g}"
    return html.escape(str(v))


def _histogram_svg(counts: list[int], zero: int, width: int = 460, height: int = 150) -> str:
    bins = len(counts)
    top = max(max(counts, default=0), zero, 1)
    pad_l, pad_b = 34, 28
    bw = (width - pad_l - 10) / (bins + 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    parts.append(f'<line x1="{pad_l}" y1="{height - pad_b}" x2="{width - 5}" y2="{height - pad_b}" stroke="#98a2b3"/>')
    bars = [("0", zero, "#98a2b3")] + [(f"{HIST_EDGES[i]:g}", c, "#3366cc") for i, c in enumerate(counts)]
    for i, (label, c, color) in enumerate(bars):
        h = (height - pad_b - 10) * c / top
        x = pad_l + i * bw
        parts.append(f'<rect x="{x + 1:.1f}" y="{height - pad_b - h:.1f}" width="{bw - 2:.1f}" height="{h:.1f}" fill="{color}">'
                     f"<title>{'exact 0' if i == 0 else '1e' + label + ' ≤ |err| < 1e' + f'{float(label) + 0.5:g}'}: {c}</title></rect>")
        if i == 0 or (i > 1 and (i - 1) % 4 == 0):  # the zero bucket, then every 2 decades
            parts.append(f'<text x="{x + bw / 2:.1f}" y="{height - pad_b + 14}" font-size="10" text-anchor="middle" '
                         f'fill="#475467">{"0" if i == 0 else "1e" + label}</text>')
    parts.append(f'<text x="4" y="12" font-size="10" fill="#475467">{top}</text>')
    parts.append(f'<text x="{width / 2:.0f}" y="{height - 2}" font-size="10" text-anchor="middle" fill="#475467">'
                 "|engine − reference| (log scale)</text></svg>")
    return "".join(parts)


def render_html(report: ParityReport, *, title: str, context: dict[str, Any] | None = None) -> str:
    rows = []
    totals: dict[str, tuple[list[int], int]] = {}
    for case in report.cases:
        for o in case.outputs:
            cls = "" if o.passed else ' class="bad"'
            rows.append(
                f"<tr{cls}><td class='l'>{html.escape(case.label)}</td><td class='l'>{html.escape(o.name)}</td>"
                f"<td class='l'>{o.shape}</td><td>{_fmt(o.max_abs)}</td><td>{_fmt(o.max_rel)}</td>"
                f"<td>{_fmt(o.rel_l2)}</td><td>{_fmt(o.cosine)}</td><td>{_fmt(o.argmax)}</td><td>{_fmt(o.equal)}</td>"
                f"<td>{o.nan}/{o.inf}</td><td class='l'>{'pass' if o.passed else html.escape('; '.join(o.failures))}</td></tr>"
            )
            counts, zero = totals.get(o.name, ([0] * (len(HIST_EDGES) - 1), 0))
            if o.histogram:
                counts = [a + b for a, b in zip(counts, o.histogram)]
            totals[o.name] = (counts, zero + o.exact_zero)
    hists = "".join(
        f"<figure><figcaption>{html.escape(name)}</figcaption>{_histogram_svg(c, z)}</figure>"
        for name, (c, z) in totals.items()
    )
    tol_rows = "".join(
        f"<tr><td class='l'>{html.escape(k)}</td>" + "".join(f"<td>{_fmt(v)}</td>" for v in t.values()) + "</tr>"
        for k, t in [("all outputs", report.policy.to_dict()["default"])] + list(report.policy.to_dict()["per_output"].items())
    )
    tol_head = "".join(f"<th>{k}</th>" for k in report.policy.to_dict()["default"])
    ctx = "".join(f"<tr><td class='l'>{html.escape(str(k))}</td><td class='l'>{html.escape(str(v))}</td></tr>"
                  for k, v in (context or {}).items())
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report.notes)
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style></head><body>
<h1>{html.escape(title)} <span class="badge {report.status}">{report.status}</span></h1>
<p class="muted">precision {html.escape(report.precision)} · {len(report.cases)} input case(s) · failing outputs are shaded</p>
<table>{ctx}</table>
{f"<ul>{notes}</ul>" if notes else ""}
<h2>Error distribution per output (all cases)</h2><div class="hists">{hists}</div>
<h2>Metrics</h2>
<table><tr><th class='l'>case</th><th class='l'>output</th><th class='l'>shape</th><th>max abs</th><th>max rel</th>
<th>rel L2</th><th>cosine</th><th>argmax</th><th>equal</th><th>NaN/Inf</th><th class='l'>verdict</th></tr>{''.join(rows)}</table>
<h2>Tolerances</h2><table><tr><th class='l'>scope</th>{tol_head}</tr>{tol_rows}</table>
</body></html>
"""


def write_html(report: ParityReport, path: Path, *, title: str, context: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_html(report, title=title, context=context), encoding="utf-8")
    tmp.replace(path)
    return path
