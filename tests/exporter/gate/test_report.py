"""report.html as people see it: real reports (a passed FP32 build, a failed re-check, an FP16 build
with nodes kept in FP32) rendered by headless Chromium. Screenshots must be real renders (the
requested size, many colours, the verdict badge's green or red); the page's layout is probed by a
script appended to a copy of the page, run in iframes of exactly 390, 1024 and 1280 px (headless
Chromium's --dump-dom lays a window out at 500 px at least, so --window-size cannot give 390): the
page never scrolls sideways, the verdict column is inside the viewport at desktop widths, and a table
wider than a phone scrolls inside its own box.

Chromium comes from apt (`apt-get install chromium`); outside CI these tests skip without it, in
CI (the CI environment variable set) they fail."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from exporter.gate.parity import ParityReport, TolerancePolicy, compare_case
from exporter.gate.report import KEEP_OPEN, kept_fp32_section, render_html, tolerance_marker

# In `make test` (CI) with everything else; out of the fast inner loop (an fp16 build and headless Chromium: ~20 s).
pytestmark = pytest.mark.slow

WIDTHS = (390, 1024, 1280)
GREEN, RED = (0x1F, 0x8A, 0x4C), (0xC0, 0x39, 0x2B)  # the badge colours of exporter/gate/report.py
SCI = re.compile(r"^(0|\d\.\de[-+]\d{2})$")

# Appended to a copy of the page: what the layout looks like, as JSON on the iframe element.
PROBE = """<script>(function () {
  const de = document.documentElement, vw = de.clientWidth;
  const box = e => { const r = e.getBoundingClientRect(); return {left: r.left, right: r.right}; };
  const inside = (r, o) => r.left >= o.left - 0.5 && r.right <= o.right + 0.5;
  const view = {left: 0, right: vw};
  const badge = document.querySelector('.badge');
  const verdicts = [...document.querySelectorAll('table.metrics .verdict')];
  const metrics = document.querySelector('table.metrics').parentElement;
  const shown = verdicts.map(v => inside(box(v), view) && inside(box(v), box(metrics)));
  metrics.scrollLeft = metrics.scrollWidth;  // scrolled to its end, the verdict column is in its box
  const reachable = verdicts.every(v => inside(box(v), box(metrics)));
  metrics.scrollLeft = 0;
  const cells = t => t ? [...t.rows].map(tr => [...tr.cells].map(c => c.textContent.trim())) : null;
  frameElement.setAttribute('data-probe', JSON.stringify({
    innerWidth, clientWidth: vw, scrollWidth: de.scrollWidth,
    badge: {text: badge.textContent, background: getComputedStyle(badge).backgroundColor,
            inside: inside(box(badge), view)},
    verdictShown: shown, verdictReachable: reachable,
    boxes: [...document.querySelectorAll('.scroll')].map(b => ({table: b.firstElementChild.className,
      overflowX: getComputedStyle(b).overflowX, scrollWidth: b.scrollWidth, clientWidth: b.clientWidth})),
    metrics: cells(document.querySelector('table.metrics')),
    kept: cells(document.querySelector('table.kept-fp32')),
    keptText: (document.querySelector('section.kept') || {textContent: ''}).textContent,
    hists: [...document.querySelectorAll('.hists figure')].map(f => {
      const svg = f.querySelector('svg'), g = svg.querySelector('g.tolerance');
      const line = g && g.querySelector('line');
      return {name: f.querySelector('figcaption').textContent, label: g ? g.textContent : null,
              lineInSvg: !!line && inside(box(line), box(svg)), svgInView: inside(box(svg), view)};
    }),
  }));
})();</script>"""


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    why = "headless Chromium renders report.html in these tests: install it with `apt-get install chromium`"
    if os.environ.get("CI"):
        pytest.fail(f"{why} (not found on PATH, and CI is set: CI installs it)")
    pytest.skip(f"{why} (not found on PATH)")


def _run_chromium(exe: str, profile: Path, *args: str) -> str:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr[-2000:]}"
    return res.stdout


@pytest.fixture(scope="module")
def fp16_bundle(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exporter.pipeline import BuildOptions, build
    from exporter.source.shapes import parse_shapes

    out = tmp_path_factory.mktemp("report-fp16") / "b"
    return build(f"hf:{tiny_bert_dir}", BuildOptions(output=out, precision="fp16",
                                                      shapes=parse_shapes("batch=1:2:4,sequence=1:8:16"))).bundle


@pytest.fixture(scope="module")
def pages(bert_bundle: Path, fp16_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """name -> the page, its parity.json data and the bundle's manifest."""
    from exporter.gate.recheck import check_bundle

    failed_html = tmp_path_factory.mktemp("report-failed") / "report.html"
    # too strict to pass: three failures on every row, the widest verdict cells the gate writes
    failed = check_bundle(bert_bundle, tolerances=["cosine=1.5", "rel_l2=1e-12", "max_abs=1e-12"], html=failed_html,
                          trust_recorded=True)
    assert failed.status == "failed"
    out = {}
    for name, page, parity, bundle in [("passed", bert_bundle / "report.html", None, bert_bundle),
                                       ("failed", failed_html, failed.to_dict(), bert_bundle),
                                       ("fp16", fp16_bundle / "report.html", None, fp16_bundle)]:
        parity = parity or json.loads((bundle / "parity.json").read_text())
        out[name] = {"page": page, "parity": parity, "manifest": json.loads((bundle / "manifest.json").read_text())}
    assert out["passed"]["parity"]["status"] == "passed" and out["fp16"]["parity"]["status"] == "passed"
    return out


@pytest.fixture(scope="module")
def probes(chromium: str, pages: dict[str, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """(name, width) -> what PROBE recorded: one Chromium run per page, one iframe per width."""
    work = tmp_path_factory.mktemp("report-probe")
    found = {}
    for name, p in pages.items():
        doc = html.escape(p["page"].read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), quote=True)
        frames = "".join(f'<iframe id="w{w}" width="{w}" height="800" style="border:0;display:block" srcdoc="{doc}">'
                         "</iframe>" for w in WIDTHS)
        harness = work / f"{name}.html"
        # its charset said (undeclared, Chromium guesses a file's encoding from its bytes). A fresh clone's run
        # (2026-12-06) once found no "1 − cos" in the fp16 page's table head, and passed when rerun; a misread "−" is
        # the suspected cause, not reproduced (the same pages read the same with and without the declaration)
        harness.write_text(f'<!doctype html><html><head><meta charset="utf-8"></head><body style="margin:0">{frames}'
                           '</body></html>', encoding="utf-8")
        dom = _run_chromium(chromium, work / "profile", "--window-size=1400,900", "--dump-dom", harness.as_uri())
        for w in WIDTHS:
            m = re.search(rf'<iframe id="w{w}"[^>]*?data-probe="([^"]*)"', dom)
            assert m, f"no layout probe from the {w} px frame of {name}: {dom[:500]}"
            found[name, w] = json.loads(html.unescape(m.group(1)))
            assert found[name, w]["innerWidth"] == w
    return found


@pytest.fixture(scope="module")
def screenshots(chromium: str, pages: dict[str, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("report-shots")
    shots = {}
    for name, w in [("passed", 1280), ("failed", 1280), ("failed", 390), ("fp16", 1024)]:
        png = work / f"{name}-{w}.png"
        _run_chromium(chromium, work / "profile", f"--window-size={w},900", f"--screenshot={png}",
                      pages[name]["page"].as_uri())
        shots[name, w] = png
    return shots


@pytest.mark.parametrize("width", [1024, 1280])
@pytest.mark.parametrize("name", ["passed", "failed", "fp16"])
def test_desktop_widths_fit_and_show_every_verdict(probes, name, width):
    p = probes[name, width]
    assert p["scrollWidth"] <= p["clientWidth"] <= p["innerWidth"], p  # the page does not scroll sideways
    assert p["badge"]["inside"] and p["badge"]["text"] == ("failed" if name == "failed" else "passed")
    assert len(p["verdictShown"]) == len(p["metrics"]) and all(p["verdictShown"]), p["verdictShown"]
    metrics_box = next(b for b in p["boxes"] if b["table"] == "metrics")
    assert metrics_box["scrollWidth"] <= metrics_box["clientWidth"], metrics_box  # nothing hidden in its box
    assert all(h["svgInView"] for h in p["hists"])


@pytest.mark.parametrize("name", ["passed", "failed", "fp16"])
def test_phone_width_scrolls_tables_in_their_box_not_the_page(probes, name):
    p = probes[name, 390]
    assert p["scrollWidth"] <= p["clientWidth"], p
    assert p["badge"]["inside"] and all(h["svgInView"] for h in p["hists"])
    assert p["boxes"] and all(b["overflowX"] == "auto" for b in p["boxes"]), p["boxes"]
    metrics_box = next(b for b in p["boxes"] if b["table"] == "metrics")
    assert metrics_box["scrollWidth"] > metrics_box["clientWidth"]  # too wide for a phone: it scrolls ...
    assert p["verdictReachable"]  # ... and scrolled to its end, the verdict column is inside its box


@pytest.mark.parametrize("name", ["passed", "failed", "fp16"])
def test_cosine_shown_as_one_minus_cos_from_the_full_precision_json(probes, pages, name):
    head, *rows = probes[name, 1280]["metrics"]
    col = head.index("1 − cos")
    outputs = [o for c in pages[name]["parity"]["cases"] for o in c["outputs"]]
    assert len(rows) == len(outputs) > 0
    for row, o in zip(rows, outputs):
        assert SCI.match(row[col]), row
        assert row[col] == ("0" if o["cosine"] == 1 else f"{1 - o['cosine']:.1e}")
        for key in ("max_abs", "rel_l2"):  # 3 significant digits in scientific notation below 0.01
            shown = row[head.index(key.replace("_", " ").replace("l2", "L2"))]
            assert o[key] == 0 or o[key] >= 1e-2 or shown == f"{o[key]:.2e}", (key, shown, o[key])
    assert any(row[col] != "0" for row in rows)
    assert len({row[col] for row in rows}) > 1  # rows can be told apart
    assert any(o["cosine"] != round(o["cosine"], 6) for o in outputs)  # parity.json keeps every digit


def test_failed_report_shows_every_failing_row_and_why(probes, pages):
    head, *rows = probes["failed", 1280]["metrics"]
    verdict = head.index("verdict")
    assert rows and all(r[verdict].startswith("fail") for r in rows)
    assert all("1 − cos" in r[verdict] and "rel_l2" in r[verdict] and "max_abs" in r[verdict] for r in rows)
    assert probes["failed", 1280]["badge"]["background"] == f"rgb({RED[0]}, {RED[1]}, {RED[2]})"
    for name in ("passed", "fp16"):
        head, *rows = probes[name, 1280]["metrics"]
        assert all(r[head.index("verdict")] == "pass" for r in rows)
        assert probes[name, 1280]["badge"]["background"] == f"rgb({GREEN[0]}, {GREEN[1]}, {GREEN[2]})"


@pytest.mark.parametrize("name", ["passed", "failed", "fp16"])
def test_every_histogram_marks_the_tolerance(probes, pages, name):
    hists = probes[name, 1280]["hists"]
    assert sorted(h["name"] for h in hists) == sorted({o["name"] for c in pages[name]["parity"]["cases"]
                                                        for o in c["outputs"]})
    assert all(h["label"] and "tolerance" in h["label"] and h["lineInSvg"] for h in hists), hists


def test_kept_fp32_lists_the_manifests_nodes_and_reasons(probes, pages):
    nodes = pages["fp16"]["manifest"]["precision"]["realised"]["fp32_nodes"]
    assert nodes, "the tiny BERT's FP16 build keeps its attention-mask nodes in FP32"
    kept = probes["fp16", 1280]["kept"]
    assert kept[0] == ["node", "op", "reason"]
    assert kept[1:] == [[n["node"], n["op"], n["reason"]] for n in nodes]
    assert f"{len(nodes)} node(s) kept in FP32" in probes["fp16", 1280]["keptText"]
    for name in ("passed", "failed"):
        assert probes[name, 1280]["kept"] is None and "none (fp32 build)" in probes[name, 1280]["keptText"]


def test_screenshots_are_real_renders_with_the_verdict_badge(screenshots):
    from PIL import Image

    for (name, width), png in screenshots.items():
        assert png.is_file(), png
        with Image.open(png) as im:
            assert im.size == (width, 900)
            rgb = im.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) >= 16, (png, len(colours or []))
        badge = RED if name == "failed" else GREEN
        top = rgb.crop((0, 0, width, 120))  # the title line and its badge
        hits = sum(1 for px in top.getdata() if all(abs(a - b) <= 3 for a, b in zip(px, badge)))
        assert hits >= 300, f"{png}: {hits} badge-coloured pixels at the top"


# -- the page's parts, without a browser -----------------------------------------------------------------
def _report(policy: TolerancePolicy, noise: float = 1e-6) -> ParityReport:
    import numpy as np

    ref = np.linspace(-1, 1, 64, dtype=np.float32).reshape(4, 16)
    got = ref + noise * np.cos(np.arange(64, dtype=np.float32)).reshape(4, 16)
    report = ParityReport("fp32", policy)
    report.cases.append(compare_case("c", {"x": ref}, {"y": ref}, {"y": got}, policy))
    return report.finish()


def test_tolerance_marker_is_the_absolute_tolerance_or_the_scaled_rel_l2_one():
    report = _report(TolerancePolicy.for_precision("fp32"))
    o = report.cases[0].outputs[0]
    value, what = tolerance_marker(report, "y")
    assert value == pytest.approx(o.max_abs * 1e-4 / o.rel_l2) and "rel L2" in what
    strict = _report(TolerancePolicy.for_precision("fp32", ["y:max_abs=1e-3"]))
    assert tolerance_marker(strict, "y") == (1e-3, "max abs ≤ 0.001")
    assert tolerance_marker(_report(TolerancePolicy.for_precision("fp32"), noise=0.0), "y") is None  # nothing to scale
    page = render_html(report, title="t")
    assert page.count('class="tolerance"') == 1 and "<script" not in page


def test_kept_fp32_collapses_long_lists_and_names_the_parts():
    node = {"node": "n", "op": "Softmax", "reason": "AutoCast: reference IO out of range"}
    realised = {"fp32_nodes": [node] * (KEEP_OPEN + 1), "nodes_by_dtype": {"float16": 9, "float32": KEEP_OPEN + 1}}
    long = kept_fp32_section({"requested": "fp16", "realised": realised,
                              "fallback": [{"round": 1, "failures": ["c/y: rel_l2 0.2 > 0.01"],
                                            "kept_fp32": [{"node": "n", "op": "Softmax", "reason": "r"}], "stopped": None}]})
    assert "<details>" in long and f"{KEEP_OPEN + 1} nodes kept in FP32: Softmax ×{KEEP_OPEN + 1}" in long
    assert "round 1: gate failed on c/y: rel_l2 0.2 &gt; 0.01" in long
    short = kept_fp32_section({"requested": "bf16", "realised": {"fp32_nodes": [node]}})
    assert "<details>" not in short and "Softmax" in short and "<th class='l'>part</th>" not in short
    towers = kept_fp32_section({"requested": "fp16", "parts": {"text": {"requested": "fp16", "realised": {"fp32_nodes": [node]}},
                                                               "image": {"requested": "fp16", "realised": {"fp32_nodes": []}}}})
    assert "<th class='l'>part</th>" in towers and "<td class='l'>text</td>" in towers and "image: 0 node(s)" in towers
    assert "none (fp32 build)" in kept_fp32_section({"requested": "fp32", "realised": {}})
    assert kept_fp32_section(None) == "" and kept_fp32_section({"requested": "int8"}) == ""
