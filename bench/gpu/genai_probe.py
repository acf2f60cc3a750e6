"""What batch 8 can reach on ONNX Runtime GenAI 0.18 (issue 18's "≥ 400 tok/s per sequence at batch 8"), on the
model of bench/gpu/llm_bench.py (Qwen2.5-1.5B sizes, random weights, BF16, 128-token prompts, 128 new tokens):

    python3 bench/gpu/genai_probe.py --out $OUT

1. og.Generator at batch 8 on the builder's default decoder, with and without each config overlay that
   runtimes/genai.py applies (eos/pad ids, engine.static_batching), to see whether any costs speed;
2. og.Engine (static batching) with 8 concurrent requests, CUDA graph on and off;
3. the builder's PagedAttention decoder (`use_paged_attention=true`, engine.dynamic_batching: GenAI's serving
   path), og.Engine with 1 and 8 concurrent requests, CUDA graph on and off.
Every measurement goes to OUT/genai_probe.json as soon as it is known; a failing one is recorded, not fatal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import llm_bench  # noqa: E402  (bench/gpu/llm_bench.py: the model and the prompts)

PROMPT, NEW, RUNS = llm_bench.PROMPT, llm_bench.NEW, 3


def build(src: Path, out: Path, device: str, precision: str, extra: list[str]) -> float:
    from onnxruntime_genai.models import builder

    t = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        opts = builder.parse_extra_options(None, str(src), str(out), precision, device, str(out.parent / "cache"), extra)
        builder.create_model(None, str(src), str(out), precision, device, str(out.parent / "cache"), **opts)
    return round(time.perf_counter() - t, 1)


def model(folder: Path, device: str, graph: bool, overlay: dict | None):
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    if overlay:
        config.overlay(json.dumps(overlay))
    config.clear_providers()
    if device == "cuda":
        config.append_provider("cuda")
        if graph:
            config.set_provider_option("cuda", "enable_cuda_graph", "1")
    return og.Model(config)


def generator_run(m, prompts: list[list[int]]) -> tuple[float, float]:
    """(time to first token ms, decode tok/s per sequence) of llm_bench's GenAI greedy loop."""
    r = llm_bench.genai_greedy(m, prompts, NEW)
    assert r.count == NEW
    return r.ttft_ms, (NEW - 1) / (r.decode_ms / 1e3)


def engine_run(m, prompts: list[list[int]]) -> tuple[float, float, float]:
    """8 (or 1) requests begun together; (median time to first token ms, median decode tok/s per request, wall s)."""
    import numpy as np
    import onnxruntime_genai as og

    e = og.Engine(m)
    buf = e.create_event_buffer(512)
    reqs, first, last, count = [], {}, {}, {}
    t0 = time.perf_counter()
    for p in prompts:
        ro = og.RequestOptions()
        ro.set_max_session_tokens(PROMPT + NEW)
        r = e.create_request(options=ro)
        turn = og.TurnOptions(r)
        turn.set_max_generated_tokens(NEW)
        turn.set_min_generated_tokens(NEW)
        turn.set_do_sample(False)
        r.begin_turn(np.array(p, np.int32), turn)
        reqs.append(r)
    while e.has_pending_requests():
        for ev in e.run(buf):
            k = id(ev.request)
            now = time.perf_counter()
            if int(ev.flags.value) & int(og.EngineEventFlags.TOKEN.value):
                first.setdefault(k, now)
                last[k] = now
                count[k] = count.get(k, 0) + 1
    wall = time.perf_counter() - t0
    assert all(c == NEW for c in count.values()) and len(count) == len(prompts), count
    ttft = statistics.median((first[k] - t0) * 1e3 for k in first)
    tps = statistics.median((count[k] - 1) / (last[k] - first[k]) for k in first)
    for r in reqs:
        r.close()
    return ttft, tps, wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/out"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/genai-probe"))
    ap.add_argument("--smoke", action="store_true", help="CPU, 2 layers, FP32: checks the script only")
    args = ap.parse_args()
    device, precision = ("cpu", "fp32") if args.smoke else ("cuda", "bf16")
    if args.smoke:
        llm_bench.DEVICE, llm_bench.PRECISION, llm_bench.SIZES = "cpu", "fp32", llm_bench.SMOKE
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    data: dict = {"command": " ".join(sys.argv), "setup": {"prompt": PROMPT, "new": NEW, "runs": RUNS}, "rows": []}

    def save() -> None:
        (args.out / "genai_probe.json").write_text(json.dumps(data, indent=2, default=str) + "\n")

    def measure(name: str, fn) -> None:
        try:
            results = [fn() for _ in range(RUNS + 1)][1:]  # the first run warms up
            row = {"variant": name, "ttft_ms": round(statistics.median(r[0] for r in results), 2),
                   "decode_tokens_per_s_per_seq": round(statistics.median(r[1] for r in results), 1)}
            if len(results[0]) > 2:
                row["wall_s"] = round(statistics.median(r[2] for r in results), 3)
        except Exception as exc:
            row = {"variant": name, "failed": f"{type(exc).__name__}: {str(exc)[:400]}",
                   "traceback": traceback.format_exc()[-1500:]}
        data["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
        save()

    src = args.work / "model"
    if not (src / "config.json").is_file():
        llm_bench.make_model(src)
    plain, paged = args.work / "plain", args.work / "paged"
    data["build_s"] = {"plain": build(src, plain, device, precision, [])}
    save()
    p8, p1 = llm_bench.prompts(8), llm_bench.prompts(1)
    vocab = int(json.loads((plain / "genai_config.json").read_text())["model"]["vocab_size"])
    ours = {"model": {"eos_token_id": vocab - 1, "pad_token_id": vocab - 1}}
    static = {"engine": {"static_batching": {"max_batch_size": 8}}}
    for label, overlay in (("no overlay", None), ("eos/pad overlay", ours), ("static_batching overlay", static),
                           ("both overlays (runtimes/genai.py)", {"model": ours["model"], **static})):
        m = model(plain, device, False, overlay)
        measure(f"Generator batch 8, {label}", lambda m=m: generator_run(m, p8))
        del m
    for graph in (False, True):
        m = model(plain, device, graph, static)
        measure(f"Engine (static batching), 8 requests, cuda graph {graph}", lambda m=m: engine_run(m, p8))
        del m
    try:
        data["build_s"]["paged"] = build(src, paged, device, precision,
                                         ["use_paged_attention=true", "max_batch_size=8", "gpu_utilization_factor=0.2"])
        data["paged_engine_config"] = json.loads((paged / "genai_config.json").read_text()).get("engine")
    except Exception as exc:
        data["build_s"]["paged"] = f"failed: {type(exc).__name__}: {str(exc)[:400]}"
    save()
    if (paged / "genai_config.json").is_file():
        for graph in (False, True):
            try:
                m = model(paged, device, graph, None)
            except Exception as exc:
                data["rows"].append({"variant": f"paged model, cuda graph {graph}", "failed": f"{type(exc).__name__}: {exc}"})
                save()
                continue
            for prompts, n in ((p1, 1), (p8, 8)):
                measure(f"PagedAttention + Engine (dynamic batching), {n} request(s), cuda graph {graph}",
                        lambda m=m, prompts=prompts: engine_run(m, prompts))
            del m
    print("done", flush=True)


if __name__ == "__main__":
    main()
