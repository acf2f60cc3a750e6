"""Decode speed of a Qwen2.5-1.5B-sized causal LM on the lent GPU, BF16, random weights.

    python3 bench/gpu/llm_bench.py --out $OUT [--budget-s 560]

One call does it all, stage by stage, writing $OUT/llm_bench.json after each (a stage that fails or
runs past the budget is recorded, not fatal):
 1. model: Qwen2Config with Qwen2.5-1.5B's sizes (28 layers, hidden 1536, 12 query / 2 key-value
    heads, vocabulary 151936, tied embeddings), random weights (std 0.02), saved in BF16;
 2. build: `enginekit build hf:MODEL --device cuda --precision bf16 --lowering native
    --shapes batch=1:8:8,sequence=1:128:256,total_sequence=2:256:512` (prefill + decode engines,
    ORT CUDA fusions: GroupQueryAttention on the decode graph), its token gate against
    transformers FP32 on the GPU;
 3. enginekit: runtimes.generate on the bundle (ORT CUDA, IO binding, KV cache kept on the GPU),
    128-token prompts (random ids, the same for every variant), 128 new tokens, greedy, no stop
    token; batch 1 and 8; time to first token and decode tokens/s per sequence, median of 3;
 4. transformers eager (BF16, dynamic cache) and 5. transformers with a static cache, whose decode
    steps generate() compiles with torch.compile (transformers 5's own path), same prompts.
Timing: CUDA is synchronized before every clock read; warm-up runs are not timed.
`--smoke` runs the same stages on the CPU with a 2-layer model in FP32 (no compile stage): it checks
the script, not the speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

PROMPT, NEW, BATCHES, RUNS = 128, 128, (1, 8), 3
QWEN25_15B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_id=151643,
                  pad_token_id=151643, bos_token_id=151643)


SMOKE = dict(QWEN25_15B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=151936)
DEVICE, PRECISION, SIZES = "cuda", "bf16", QWEN25_15B
EXPORTER = "auto"  # --exporter: auto (transformers' own exporter first) or torch (the generic KV-cache wrapper)


def _sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


class Recorder:
    def __init__(self, out: Path, budget_s: float):
        self.out, self.t0, self.budget = out, time.perf_counter(), budget_s
        self.data: dict = {"command": " ".join(sys.argv), "stages": {}, "rows": [], "notes": []}

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "llm_bench.json").write_text(json.dumps(self.data, indent=2, default=str) + "\n")

    def stage(self, name: str, fn, need_s: float):
        if self.left() < need_s:
            self.data["stages"][name] = {"status": f"skipped: {self.left():.0f} s left of the budget, needs ~{need_s:.0f}"}
            self.save()
            return None
        t = time.perf_counter()
        try:
            result = fn()
            self.data["stages"][name] = {"status": "ok", "seconds": round(time.perf_counter() - t, 1)}
            return result
        except Exception as exc:
            self.data["stages"][name] = {"status": f"failed: {type(exc).__name__}: {str(exc)[:1500]}",
                                         "traceback": traceback.format_exc()[-3000:],
                                         "seconds": round(time.perf_counter() - t, 1)}
            print(f"stage {name} failed: {exc}", file=sys.stderr)
            return None
        finally:
            print(f"[{time.perf_counter() - self.t0:6.1f} s] {name}: {self.data['stages'][name]['status'][:200]}", flush=True)
            self.save()


def environment() -> dict:
    import onnxruntime as ort
    import torch
    import transformers

    gpu = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
            "gpu": {"name": gpu.name, "cc": f"{gpu.major}.{gpu.minor}", "memory_gib": round(gpu.total_memory / 2**30, 1)}
            if gpu else None}


def make_model(folder: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(**SIZES, architectures=["Qwen2ForCausalLM"])
    with torch.device(DEVICE):
        model = transformers.Qwen2ForCausalLM(cfg)
    model.to(torch.bfloat16 if PRECISION == "bf16" else torch.float32).eval().save_pretrained(folder)
    del model


def build_bundle(folder: Path, bundle: Path) -> dict:
    from exporter.pipeline import BuildOptions, build
    from exporter.source.shapes import parse_shapes

    opts = BuildOptions(device=DEVICE, precision=PRECISION, lowering="native" if PRECISION != "fp32" else "autocast",
                        output=bundle, force=True, exporter=EXPORTER,
                        # random weights give near-flat logits: BF16 storage alone puts their rel-L2 at
                        # ~0.032 against FP32 (measured on the H200; the default bf16 bound is 0.03), so the
                        # bench allows 0.05 and records the measured value; tokens are still gated
                        tolerances=["logits:rel_l2=0.05"] if PRECISION == "bf16" else [],
                        shapes=parse_shapes(f"batch=1:8:8,sequence=1:{PROMPT}:256,total_sequence=2:256:512"))
    res = build(f"hf:{folder}", opts, progress=lambda m: print("   ", m, flush=True))
    return {"parity": res.parity.summary(), "timings_s": res.timings, "exporter": res.manifest.source["exporter"],
            "fusions": res.manifest.target.options.get("generation"), "positions":
            json.loads((bundle / "generation.json").read_text())["positions"]}


def prompts(batch: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.integers(1000, 150000, size=(8, PROMPT))[:batch].tolist()


def bench_enginekit(bundle: Path, rec: Recorder) -> None:
    from runtimes.generate import SamplingOptions, load_generator

    with load_generator(bundle, device=DEVICE) as g:
        for b in BATCHES:
            p = prompts(b)
            g.generate_ids(p, SamplingOptions(max_new_tokens=16, stop_token_ids=[]))  # warm-up: ORT's arena, kernels
            runs = [g.generate_ids(p, SamplingOptions(max_new_tokens=NEW, stop_token_ids=[]))[0] for _ in range(RUNS)]
            assert all(len(r.tokens) == NEW for r in runs)
            tps = [(NEW - 1) / (r.decode_ms / 1e3) for r in runs]
            rec.data["rows"].append({"variant": f"enginekit ORT {DEVICE} {PRECISION} (IO binding, GQA)", "batch": b,
                                     "ttft_ms": round(statistics.median(r.ttft_ms for r in runs), 2),
                                     "decode_tokens_per_s_per_seq": round(statistics.median(tps), 1),
                                     "decode_ms_per_token": round(1e3 / statistics.median(tps), 3),
                                     "tokens_first_run": runs[0].tokens[:8]})
            rec.save()


def profile_decode(bundle: Path, rec: Recorder) -> None:
    """Where a decode step's time goes: CUPTI (torch.profiler records every CUDA kernel in the process,
    ONNX Runtime's included) over a 32-token greedy run at batch 1 and 8; GPU busy time per decode step
    against the wall time per step. A step whose kernels take far less than its wall time is bound by
    the host (ORT's per-node launch work), which only replaying a captured CUDA graph removes."""
    from torch.profiler import ProfilerActivity, profile

    from runtimes.generate import SamplingOptions, load_generator

    new = 32
    with load_generator(bundle, device=DEVICE) as g:
        for b in BATCHES:
            p = prompts(b)
            g.generate_ids(p, SamplingOptions(max_new_tokens=8, stop_token_ids=[]))
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                r = g.generate_ids(p, SamplingOptions(max_new_tokens=new, stop_token_ids=[]))[0]
            kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
            gpu_ms = sum(e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
                         for e in kernels) / 1e3
            steps = new - 1
            # the prefill's kernels are in the total too: subtract its share by the time to first token at most
            rec.data.setdefault("profile", []).append({
                "batch": b, "decode_wall_ms_per_step": round(r.decode_ms / steps, 3),
                "gpu_kernel_ms_per_step_upper_bound": round(gpu_ms / steps, 3),
                "kernels_per_step": round(len(kernels) / (steps + 1), 1),
                "note": "kernel time over all steps (prefill included) divided by decode steps: an upper bound"})
            rec.save()


def _hf_generate(model, ids, mask, new: int, **kw) -> float:

    _sync()
    t = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, **kw)
    _sync()
    assert out.shape[1] == ids.shape[1] + new
    return (time.perf_counter() - t) * 1e3


def bench_transformers(folder: Path, rec: Recorder, variant: str) -> None:
    import torch
    import transformers

    dtype = torch.bfloat16 if PRECISION == "bf16" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(DEVICE).eval()
    kw = {"cache_implementation": "static"} if variant == "compile" else {}
    name = (f"transformers {PRECISION}, static cache + torch.compile (generate's own)" if variant == "compile"
            else f"transformers {PRECISION} eager (dynamic cache)")
    try:
        for b in BATCHES:
            ids = torch.tensor(prompts(b), device=DEVICE)
            mask = torch.ones_like(ids)
            for _ in range(2):  # warm-up (compiles the decode step for this shape)
                _hf_generate(model, ids, mask, 8 if variant == "eager" else NEW, **kw)
            ttft = statistics.median(_hf_generate(model, ids, mask, 1, **kw) for _ in range(RUNS))
            total = statistics.median(_hf_generate(model, ids, mask, NEW, **kw) for _ in range(RUNS))
            tps = (NEW - 1) / ((total - ttft) / 1e3)
            rec.data["rows"].append({"variant": name, "batch": b, "ttft_ms": round(ttft, 2),
                                     "decode_tokens_per_s_per_seq": round(tps, 1),
                                     "decode_ms_per_token": round(1e3 / tps, 3)})
            rec.save()
    finally:
        del model
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


def ratios(rec: Recorder) -> None:
    rows = rec.data["rows"]
    out = {}
    for b in BATCHES:
        by = {r["variant"].split(" ")[0] + (" compile" if "compile" in r["variant"] else ""): r for r in rows if r["batch"] == b}
        e = by.get("enginekit")
        if e is None:
            continue
        for base in ("transformers", "transformers compile"):
            if base in by:
                out[f"batch {b}: enginekit / {base} decode tokens/s"] = round(
                    e["decode_tokens_per_s_per_seq"] / by[base]["decode_tokens_per_s_per_seq"], 2)
                out[f"batch {b}: {base} / enginekit time to first token"] = round(by[base]["ttft_ms"] / e["ttft_ms"], 2)
    rec.data["ratios"] = out
    rec.save()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    ap.add_argument("--work", default="/tmp/llm-bench")
    ap.add_argument("--budget-s", type=float, default=560.0)
    ap.add_argument("--smoke", action="store_true", help="CPU, 2 layers, FP32: checks the script only")
    ap.add_argument("--stages", default="model,build,enginekit,profile,eager,compile",
                    help="which stages to run (comma list); split over two device calls when one would pass 10 "
                         "minutes: the model folder and the bundle under --work are reused by a later call")
    ap.add_argument("--exporter", default="auto", choices=["auto", "torch", "transformers"],
                    help="the LLM exporter the build stage uses")
    args = ap.parse_args()
    stages = {s.strip() for s in args.stages.split(",") if s.strip()}
    global DEVICE, PRECISION, SIZES, NEW, EXPORTER
    EXPORTER = args.exporter
    if args.smoke:
        DEVICE, PRECISION, SIZES, NEW = "cpu", "fp32", SMOKE, 16
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    rec = Recorder(out, args.budget_s)
    if (out / "llm_bench.json").is_file():  # a later call of a split run: keep the earlier stages' rows
        earlier = json.loads((out / "llm_bench.json").read_text())
        rec.data["stages"], rec.data["rows"] = earlier.get("stages", {}), earlier.get("rows", [])
        rec.data["build"] = earlier.get("build")
        rec.data["notes"].append(f"continued from an earlier call: {earlier.get('command')}")
    rec.data["environment"] = environment()
    rec.data["setup"] = {"model": "Qwen2 config at Qwen2.5-1.5B sizes, random weights" if not args.smoke else "smoke", "prompt_tokens": PROMPT,
                         "new_tokens": NEW, "runs": RUNS, "batches": BATCHES, "sampling": "greedy, no stop token"}
    work = Path(args.work)
    folder, bundle = work / "qwen2.5-1.5b-random", work / "engines" / "qwen-1.5b-ort-bf16"
    if "model" in stages and not (folder / "config.json").is_file():
        rec.stage("model", lambda: make_model(folder), 30)
    if "build" in stages:
        built = rec.stage("build", lambda: build_bundle(folder, bundle), 120)
        if built:
            rec.data["build"] = built
    if "enginekit" in stages and (bundle / "manifest.json").is_file():
        rec.stage("enginekit", lambda: bench_enginekit(bundle, rec), 40)
    if "profile" in stages and DEVICE == "cuda" and (bundle / "manifest.json").is_file():
        rec.stage("profile", lambda: profile_decode(bundle, rec), 40)
    if "eager" in stages:
        rec.stage("transformers eager", lambda: bench_transformers(folder, rec, "eager"), 60)
    if "compile" in stages and DEVICE == "cuda":
        rec.stage("transformers compile", lambda: bench_transformers(folder, rec, "compile"), 90)
    ratios(rec)
    print(json.dumps({"rows": rec.data["rows"], "ratios": rec.data.get("ratios")}, indent=1))


if __name__ == "__main__":
    main()
