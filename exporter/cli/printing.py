"""How the `enginekit` commands print a build's precision, parity and calibration records (rich)."""

from __future__ import annotations

from typing import Any

from exporter.gate.parity import one_minus_cos


def _print_precision(con: Any, precision: dict[str, Any]) -> None:
    realised = precision.get("realised", {})
    if "nodes_by_dtype" not in realised:
        return
    counts = ", ".join(f"{k} {v}" for k, v in realised["nodes_by_dtype"].items())
    con.print(f"precision: {counts} nodes ({realised['cast_nodes']} casts; I/O {realised['io']})")
    for h in precision.get("fallback", []):
        kept = ", ".join(k["node"] for k in h["kept_fp32"]) or "none"
        con.print(f"  fallback round {h['round']}: kept in FP32: {kept}" + (f"  (stopped: {h['stopped']})" if h["stopped"] else ""))
    from rich.table import Table

    fp32 = realised.get("fp32_nodes", [])
    if fp32:
        t = Table(title=f"{len(fp32)} node(s) kept in FP32", title_justify="left")
        t.add_column("node")
        t.add_column("op")
        t.add_column("reason")
        for row in fp32[:40]:
            t.add_row(row["node"], row["op"], row["reason"])
        con.print(t)
        if len(fp32) > 40:
            con.print(f"[dim]… and {len(fp32) - 40} more (manifest.json: precision.realised.fp32_nodes)[/]")


def _print_parity(con: Any, report: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    if not report.cases:  # --skip-parity, or an engine that cannot run here: nothing was compared
        con.print(f"parity gate: {report.status} (no case was run)")
        for note in report.notes:
            con.print(f"[dim]note: {escape(note)}[/]")
        return
    t = Table(title=f"parity gate: {report.status}", title_justify="left")
    for col in ("output", "cases", "max abs", "rel L2", "1 − cosine", "argmax", "NaN/Inf", "verdict"):
        t.add_column(col, justify="left" if col in ("output", "verdict") else "right")
    worst = report.worst()
    failing = {o.name for c in report.cases for o in c.outputs if not o.passed}
    for name, w in worst.items():
        t.add_row(name, str(len(report.cases)), f"{w['max_abs']:.3g}", f"{w['rel_l2']:.3g}", one_minus_cos(w['cosine']),
                  f"{w['argmax']:.4f}" if "argmax" in w else "–", str(int(w.get("nan_inf", 0))),
                  "[red]fail[/]" if name in failing else "[green]pass[/]")
    con.print(t)
    for name, w in report.worst_checks().items():  # task checks: detections matched by IoU, zero-shot rankings
        bad = any(not k.passed for c in report.cases for k in c.checks if k.name == name)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in w.items())
        con.print(f"{name}: {shown}  " + ("[red]fail[/]" if bad else "[green]pass[/]"))
    for note in report.notes:
        con.print(f"[dim]note: {escape(note)}[/]")


def _print_calibration(con: Any, cal: dict[str, Any], realised: dict[str, Any]) -> None:
    from rich.table import Table

    samples = cal["samples"]
    con.print(f"calibration: {cal['method']} ranges from {samples['calibration']} samples of {cal['data']} "
              f"(cache {cal['cache'].get(cal['method'], '?')}); accuracy on {samples['evaluation']} held-out samples")
    t = Table(title="accuracy vs FP32 on held-out samples (per sample)", title_justify="left")
    for col in ("method", "output", "cosine min", "cosine mean", "top-1", "budget"):
        t.add_column(col, justify="left" if col in ("method", "output", "budget") else "right")
    # top-1 means something for class scores, not for embeddings: shown for logits* or a top1 budget.
    wants_top1 = any("top1" in b for b in cal["budget"])

    def top1(name: str, a: dict[str, Any]) -> str:
        return f"{a['top1']:.4f}" if "top1" in a and (wants_top1 or name.startswith("logits")) else "–"

    # One method and nothing kept in float: the comparison row would repeat the shipped one.
    compared = cal["comparison"] if len(cal["comparison"]) > 1 or realised.get("excluded_nodes") else {}
    for method, row in compared.items():
        for name, a in row["accuracy"].items():
            t.add_row(method, name, f"{a['cosine_min']:.4f}", f"{a['cosine_mean']:.4f}", top1(name, a),
                      "met" if not row["budget_misses"] else "missed")
    for name, a in cal["accuracy"].items():
        t.add_row(f"[bold]{cal['method']} (shipped)[/]", name, f"{a['cosine_min']:.4f}", f"{a['cosine_mean']:.4f}",
                  top1(name, a), "met" if cal["budget_met"] else "–" if cal["budget_met"] is None else "missed")
    con.print(t)
    quantized, excluded = realised.get("quantized_nodes", []), realised.get("excluded_nodes", [])
    smooth = realised.get("smoothquant")
    if smooth:
        con.print(f"smoothquant: {len(smooth['activations'])} activations smoothed (alpha {smooth['alpha']})")
    con.print(f"quantized ({len(quantized)}): {', '.join(quantized) or 'none'}")
    con.print(f"kept in float ({len(excluded)})" + (f": {', '.join(excluded)} (the most sensitive layers, until the "
                                                    f"budget {', '.join(cal['budget'])} held)" if excluded else ""))
    speed = cal.get("speed")
    if speed and speed.get("device") == "cuda" and "int8_ms" in speed:
        con.print(f"CUDA latency at the opt shape {speed['shapes']}: FP16 {speed['fp16_ms']:.3f} ms, INT8 "
                  f"{speed['int8_ms']:.3f} ms (INT8 / FP16 {speed['int8_over_fp16']:.2f}×)")
    elif speed and "fp32_ms" in speed:
        con.print(f"CPU latency on a held-out batch {speed['shapes']}: FP32 {speed['fp32_ms']:.2f} ms, INT8 "
                  f"{speed['int8_ms']:.2f} ms, speedup {speed['speedup']:.2f}×")
    for note in cal.get("notes", []):
        con.print(f"[yellow]warning:[/] {note}")
