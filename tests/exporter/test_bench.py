"""`enginekit bench` on the CPU: the same inputs for every variant, speedups against torch eager FP32,
results saved as JSON and PNG. (GPU timings come from the lent GPU, not from tests.)"""

import json

import pytest

from exporter.bench import BenchOptions, batch_feeds, run_bench, save
from tests.conftest import run_cli


def test_bench_rows_speedups_and_files(bert_bundle, tmp_path):
    opts = BenchOptions(batches=[1, 2, 64], baselines=["eager"], runs=3, warmup=1, min_seconds=0.0)
    result = run_bench([bert_bundle], opts)
    rows = result["rows"]
    assert {r["variant"] for r in rows} == {"torch eager fp32", "ort-cpu fp32"}
    assert {r["batch"] for r in rows} == {1, 2}  # 64 is outside the bundle's batch range 1..16: skipped
    assert result["skipped"] == [{"bundle": str(bert_bundle), "variant": "bert", "batch": 64,
                                  "reason": "outside the engine's batch range 1..16"}]
    for r in rows:
        assert r["p50_ms"] > 0 and r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert abs(r["throughput"] - r["batch"] * 1000 / r["p50_ms"]) < 0.01 * r["throughput"]
        assert r["speedup"] is not None
    assert all(r["speedup"] == 1.0 for r in rows if r["variant"] == "torch eager fp32")
    out = tmp_path / "b.json"
    save(result, out, out.with_suffix(".png"), "enginekit bench …")
    assert json.loads(out.read_text())["command"] == "enginekit bench …"
    assert out.with_suffix(".png").stat().st_size > 1000


def test_batch_feeds_sets_every_batch_dim(bert_bundle):
    from runtimes.manifest import Manifest

    io = Manifest.read(bert_bundle).io
    feeds = batch_feeds(io, 3, 0)
    assert {k: v.shape for k, v in feeds.items()}["input_ids"] == (3, io.dims["sequence"].opt)
    assert batch_feeds(io, 17, 0) is None


@pytest.mark.slow
def test_bench_cli(bert_bundle, tmp_path):
    out = tmp_path / "r.json"
    proc = run_cli("bench", str(bert_bundle), "--baseline", "eager", "--batch", "1,64", "--runs", "3",
                   "--min-seconds", "0", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "ort-cpu fp32" in proc.stdout and out.exists() and out.with_suffix(".png").exists()
    assert "bert: skipped, outside the engine's batch range 1..16" in proc.stdout
    # each variant is its own progress stage, with its own time
    assert "✓ Bench torch eager fp32: batch 1" in proc.stderr and "✓ Bench ort-cpu fp32: batch 1" in proc.stderr
    bad = run_cli("bench", str(bert_bundle), "--batch", "one")
    assert bad.returncode == 2 and "--batch" in bad.stderr and "Traceback" not in bad.stderr


def test_checkpoint_after_every_row(bert_bundle):
    partials = []
    opts = BenchOptions(batches=[1, 2], baselines=["eager"], runs=2, warmup=0, min_seconds=0.0)
    final = run_bench([bert_bundle], opts, checkpoint=partials.append)
    assert [len(p["rows"]) for p in partials] == [1, 2, 3, 4] and all(p["partial"] for p in partials)
    assert "partial" not in final and len(final["rows"]) == 4


def test_engines_are_compared_with_the_best_compile_mode():
    from exporter.bench import Row, compile_ratios

    def row(variant, kind, batch, p50):
        return Row(variant, kind, batch, p50, p50, p50, batch * 1000 / p50, None)

    rows = [row("torch.compile default fp16", "torch", 1, 2.0), row("torch.compile reduce-overhead fp16", "torch", 1, 1.5),
            row("ort-cuda fp16", "engine", 1, 1.0), row("ort-cuda fp16 + cuda graph", "engine", 1, 1.2),
            row("torch.compile default fp16", "torch", 32, 10.0), row("ort-cuda fp16", "engine", 32, 12.5),
            row("ort-cuda fp32", "engine", 8, 3.0)]  # no compile row at batch 8: no ratio
    best, slower = compile_ratios(rows, [1, 8, 32])
    assert best == {1: "torch.compile reduce-overhead fp16", 32: "torch.compile default fp16"}
    assert [r.vs_compile for r in rows] == [None, None, 1.5, 1.25, None, 0.8, None]
    assert slower == ["ort-cuda fp16 at batch 32: 12.500 ms, slower than torch.compile default fp16 (10.000 ms): 0.80×"]
