"""Issue 19 on the H200: Qwen3-VL-8B's geometry (random weights; no checkpoint can be downloaded) built by
`enginekit build` with the decoder as one graph (ONNX Runtime GenAI's builder + enginekit's rewrite, the vision engine
enginekit's), gated, and benched against transformers on one 448x448 image + a 32-token question -> 64 new tokens.

    python3 bench/gpu/vlm_bench.py build  --out $OUT [--precision bf16|int4]   # the 8B folder (once) + enginekit build
    python3 bench/gpu/vlm_bench.py bench  --out $OUT [--precision bf16|int4] [--variants enginekit,profile,genai,eager,compile]
    python3 bench/gpu/vlm_bench.py parity --out $OUT [--precision bf16|int4] [--tolerance OUTPUT:METRIC=VALUE ...]

Each phase fits one device call (10 minutes) and writes OUT/vlm_bench.json as results come (a failing step is
recorded, not fatal). Work folder: /tmp/vlm8b (kept while the machine stays warm).

- build: `enginekit build --skip-parity` (the gate is the parity phase: `enginekit parity` against the FP32
  transformers model on the CPU, 95-115 s at this size on the H200 machine's 16 cores).
- bench, each variant in a fresh process so its GPU memory is its own (nvidia-smi polled every 50 ms; the peak minus
  the idle reading before it, CUDA context included):
  * enginekit: the enginekit runtime (no torch in the process, checked): vision engine + image merge + M-RoPE +
    prefill + 64 greedy steps, the decode step as a captured CUDA graph (the default) and uncaptured, each in its own
    process; 2 warm-up runs, median of 5;
  * profile: one more enginekit run under ONNX Runtime's profiler: where a decode step's time goes (shares only);
  * genai: the anchor, ONNX Runtime GenAI 0.18's builder on the same folder (its text decoder only: GenAI has no
    Qwen3-VL vision pipeline) and its own generator loop, a 230-token text prompt -> 64 tokens, CUDA graph off and
    on; 2 warm-up runs, median of 5;
  * eager / compile: transformers BF16 (sdpa) and transformers with torch.compile (static cache, reduce-overhead;
    it failed on 2026-12-03, see bench/results/vlm-one-graph/README.md): generate() with pixel_values, 64 new tokens
    (min_new_tokens), time to first token from a max_new_tokens=1 run; median of 3 after a warm-up.
  The runtime's tokens are compared with eager's (first divergence; random weights make near-ties likely).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench" / "gpu")]

WORK = Path(os.environ.get("VLM8B_WORK", "/tmp/vlm8b"))
SIDE = 448
QUESTION, NEW = 32, 64
SHAPES = "image_height=448,image_width=448,images=1:1:2,batch=1:1:4,sequence=1:256:512,total_sequence=2:512:1024"


def bundle_dir(precision: str) -> Path:
    return WORK / f"bundle-{precision}"


def record():
    """The results so far (WORK/vlm_bench.json: each device call's $OUT starts empty; main copies it there)."""
    from vlm_decoder_probe import Record

    old = WORK / "vlm_bench.json"
    rec = Record(old)
    if old.is_file():
        try:
            rec.data.update({k: v for k, v in json.loads(old.read_text()).items() if k not in ("command", "date")})
        except ValueError:
            pass
    rec.data["command"] = " ".join(["python3", "bench/gpu/vlm_bench.py", *sys.argv[1:]])
    rec.data["commands"] = [*rec.data.get("commands", []), f"{rec.data['date']}: {rec.data['command']}"]
    return rec


def prompt_ids(spec: dict) -> list[int]:
    """<|vision_start|> + the image's pads + <|vision_end|> + 32 question tokens (fixed seed)."""
    import numpy as np

    tokens = (SIDE // spec["patch_size"]) ** 2 // spec["merge_size"] ** 2
    question = np.random.default_rng(1).integers(10, 300, QUESTION).tolist()
    return [spec["vision_start_token_id"], *[spec["image_token_id"]] * tokens, spec["vision_end_token_id"], *question]


def photo():
    import numpy as np
    import skimage.data
    from PIL import Image

    return np.asarray(Image.fromarray(skimage.data.astronaut()).resize((SIDE, SIDE), Image.BICUBIC))


def build(a: argparse.Namespace, rec) -> None:
    import torch
    from vlm_decoder_probe import make_model

    folder = WORK / "hf"
    if not (folder / "config.json").is_file():
        t = time.perf_counter()
        model = make_model(folder, "8b", "cuda", torch.bfloat16)
        rec.put("model", {"parameters_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
                          "seconds": round(time.perf_counter() - t, 1), "folder_gb": _size_gb(folder)})
        del model
        torch.cuda.empty_cache()
    out = bundle_dir(a.precision)
    cmd = [sys.executable, "-m", "exporter", "build", f"hf:{folder}", "-o", str(out), "--precision", a.precision,
           "--device", "cuda", "--shapes", SHAPES, "--skip-parity", "--force"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=560)
    res = {"command": " ".join(["enginekit", *cmd[3:]]), "rc": proc.returncode, "seconds": round(time.perf_counter() - t, 1),
           "log": proc.stdout[-2500:] + proc.stderr[-1500:]}
    if proc.returncode == 0:
        m = json.loads((out / "manifest.json").read_text())
        res.update(bundle_gb=_size_gb(out), realised=m["precision"]["realised"],
                   components=sorted(json.loads((out / "generation.json").read_text())["components"]))
    rec.put(f"build_{a.precision}", res)


def _size_gb(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e9, 2)


def gpu_used_mb() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout.split()
    return int(out[0]) if out else -1


def measured(cmd: list[str], timeout: int) -> tuple[dict, float]:
    """Run a child, poll the GPU's used memory; (its JSON result, peak GB over the idle reading)."""
    base = gpu_used_mb()
    peak, done = [base], threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], gpu_used_mb())
            time.sleep(0.05)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else \
            {"error": (proc.stdout[-800:] + proc.stderr[-2500:])}
    except subprocess.TimeoutExpired:
        result = {"error": f"timed out after {timeout} s"}
    finally:
        done.set()
        th.join()
    return result, round((peak[0] - base) / 1024, 2)


def bench(a: argparse.Namespace, rec) -> None:
    me = [sys.executable, __file__]
    want = set(a.variants.split(","))
    runtime = {}
    if "enginekit" in want:
        for graph in (True, False):
            res, peak = measured([*me, "runtime-child", "--precision", a.precision, *(["--graph"] if graph else [])], 240)
            res["gpu_memory_peak_gb"] = peak
            runtime["cuda_graph" if graph else "no_graph"] = res
            rec.put(f"enginekit_{a.precision}", runtime)
        tokens = [runtime[k].get("tokens") for k in ("cuda_graph", "no_graph")]
        if all(tokens):
            runtime["captured_tokens_equal_uncaptured"] = tokens[0] == tokens[1]
            rec.put(f"enginekit_{a.precision}", runtime)
    if "profile" in want:
        res, _ = measured([*me, "runtime-child", "--precision", a.precision, "--profile"], 120)
        rec.put(f"enginekit_{a.precision}_profile", res)
    if a.precision != "bf16":
        return
    if "genai" in want:
        anchor = {}
        for graph in (False, True):
            res, peak = measured([*me, "genai-child", *(["--graph"] if graph else [])], 200)
            res["gpu_memory_peak_gb"] = peak
            anchor["cuda_graph" if graph else "no_graph"] = res
            rec.put("genai_text_only_bf16", anchor)
    ref = {}
    for mode, limit in (("eager", 200), ("compile", 300)):
        if mode in want:
            res, peak = measured([*me, "torch-child", "--mode", mode], limit)
            res["gpu_memory_peak_gb"] = peak
            ref[mode] = res
            rec.put("transformers_bf16", ref)
    eager = ref.get("eager", {}).get("tokens")
    if eager:
        for res in runtime.values():
            if isinstance(res, dict) and res.get("tokens"):
                same = next((i for i, (x, y) in enumerate(zip(res["tokens"], eager)) if x != y), len(eager))
                res["tokens_equal_to_transformers_eager_for_steps"] = same
        rec.put(f"enginekit_{a.precision}", runtime)


def runtime_child(a: argparse.Namespace) -> None:
    """No torch here: the enginekit runtime alone."""
    from runtimes.generate import SamplingOptions, load_generator

    if a.profile:  # every session the runtime opens writes ONNX Runtime's profile (runtimes/ort/runner.py's options)
        import onnxruntime as ort

        plain = ort.SessionOptions

        def with_profile():
            so = plain()
            so.enable_profiling = True
            so.profile_file_prefix = str(WORK / "profile")
            return so

        ort.SessionOptions = with_profile

    t = time.perf_counter()
    g = load_generator(bundle_dir(a.precision), device="cuda", verify=False, cuda_graph=bool(a.graph and not a.profile))
    load_s = time.perf_counter() - t
    spec = g.spec["vision"]
    ids, image = prompt_ids(spec), photo()
    opts = SamplingOptions(max_new_tokens=NEW, stop_token_ids=[])

    def once() -> dict:
        t0 = time.perf_counter()
        enc = g.encode_images_all([image])
        t1 = time.perf_counter()
        out = g.generate_ids([ids], opts, **enc)[0]
        t2 = time.perf_counter()
        return {"vision_ms": (t1 - t0) * 1e3, "ttft_ms": out.ttft_ms, "decode_tok_s": out.tokens_per_s,
                "total_s": t2 - t0, "tokens": out.tokens}

    if a.profile:
        return print(json.dumps(profiled(g, once)))
    for _ in range(2):
        once()
    runs = [once() for _ in range(5)]
    med = {k: round(statistics.median(r[k] for r in runs), 4) for k in ("vision_ms", "ttft_ms", "decode_tok_s", "total_s")}
    same = all(r["tokens"] == runs[0]["tokens"] for r in runs)
    print(json.dumps({"load_s": round(load_s, 1), **med, "runs": 5, "prompt_tokens": len(ids), "new_tokens": NEW,
                      "cuda_graph": g.cuda_graph, "cuda_graph_error": g.cuda_graph_error, "tokens_same_every_run": same,
                      "tokens": runs[0]["tokens"], "torch_imported": "torch" in sys.modules}))


def profiled(g, once) -> dict:
    """Where a decode step's time goes, from ONNX Runtime's profile of one warm run (profiling adds its own cost: these
    are shares, not the bench's numbers): each decode step's session run (model_run), the sum of its nodes' host-side
    times (CUDA kernels are launched asynchronously: a node's time is its launch, not its GPU time), and the step's
    wall time outside the session run (the runtime's Python: embedding lookup, binding, sampling, bookkeeping)."""
    once()
    r = once()
    session = g._runners[g.stages["decode"]].session
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"][-NEW:]
    nodes = [e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")]
    decode = runs[1:]  # the last run's prefill first
    per_op: dict[str, float] = {}
    sums, counts = [], []
    for run in decode:
        lo, hi = run["ts"], run["ts"] + run["dur"]
        inside = [n for n in nodes if lo <= n["ts"] <= hi]
        sums.append(sum(n["dur"] for n in inside))
        counts.append(len(inside))
        for n in inside:
            op = n.get("args", {}).get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + n["dur"] / len(decode)
    step_ms = (r["total_s"] * 1e3 - r["vision_ms"] - r["ttft_ms"]) / (NEW - 1)
    run_ms = statistics.median(x["dur"] for x in decode) / 1e3
    return {"decode_steps": len(decode), "step_wall_ms": round(step_ms, 3), "model_run_ms": round(run_ms, 3),
            "nodes_host_ms": round(statistics.median(sums) / 1e3, 3), "outside_run_ms": round(step_ms - run_ms, 3),
            "nodes_per_step": counts[0],
            "top_ops_host_ms": {k: round(v / 1e3, 3) for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])[:10]}}


def genai_child(a: argparse.Namespace) -> None:
    """The anchor in the same run: ONNX Runtime GenAI 0.18's builder on the same folder (its text decoder only: GenAI
    has no Qwen3-VL vision pipeline) and its own generator loop, a text prompt as long as the image prompt."""
    import genai_probe
    import llm_bench

    out = WORK / "genai-text"
    build_s = None
    if not (out / "genai_config.json").is_file():
        build_s = genai_probe.build(WORK / "hf", out, "cuda", "bf16", [])
    ids = prompt_ids({"patch_size": 16, "merge_size": 2, "vision_start_token_id": 11, "image_token_id": 12,
                      "vision_end_token_id": 13})  # ids below the question's range: plain text tokens here
    llm_bench.PROMPT = len(ids)  # genai_greedy's max_length = PROMPT + n
    m = genai_probe.model(out, "cuda", a.graph, None)
    for _ in range(2):
        llm_bench.genai_greedy(m, [ids], NEW)
    runs = [llm_bench.genai_greedy(m, [ids], NEW) for _ in range(5)]
    print(json.dumps({"build_s": build_s, "cuda_graph": a.graph, "prompt_tokens": len(ids), "new_tokens": NEW, "runs": 5,
                      "ttft_ms": round(statistics.median(r.ttft_ms for r in runs), 2),
                      "decode_tok_s": round(statistics.median((r.count - 1) / (r.decode_ms / 1e3) for r in runs), 1)}))


def torch_child(a: argparse.Namespace) -> None:
    import torch
    import transformers

    folder = WORK / "hf"
    model = transformers.AutoModelForImageTextToText.from_pretrained(str(folder), dtype=torch.bfloat16).to("cuda").eval()
    proc = transformers.AutoImageProcessor.from_pretrained(str(folder))
    cfg = model.config
    spec = {"patch_size": cfg.vision_config.patch_size, "merge_size": cfg.vision_config.spatial_merge_size,
            "vision_start_token_id": cfg.vision_start_token_id, "image_token_id": cfg.image_token_id,
            "vision_end_token_id": cfg.vision_end_token_id}
    ids = torch.tensor([prompt_ids(spec)], device="cuda")
    pix = proc(images=[photo()], return_tensors="pt")
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pix["pixel_values"].to("cuda"),
              image_grid_thw=pix["image_grid_thw"].to("cuda"), mm_token_type_ids=(ids == cfg.image_token_id).int(),
              do_sample=False, max_length=None)
    if a.mode == "compile":
        model.generation_config.cache_implementation = "static"
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)

    def timed(n: int) -> tuple[float, list[int]]:
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**kw, max_new_tokens=n, min_new_tokens=n)
        torch.cuda.synchronize()
        return time.perf_counter() - t, out[0, ids.shape[1]:].tolist()

    t = time.perf_counter()
    timed(NEW)
    warm_s = time.perf_counter() - t
    timed(1)
    firsts = sorted(timed(1)[0] for _ in range(3))
    totals = [timed(NEW) for _ in range(3)]
    total = statistics.median(x[0] for x in totals)
    ttft = firsts[1]
    print(json.dumps({"mode": a.mode, "first_run_s": round(warm_s, 1), "ttft_ms": round(ttft * 1e3, 2),
                      "decode_tok_s": round((NEW - 1) / (total - ttft), 1), "total_s": round(total, 4), "runs": 3,
                      "torch_max_allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
                      "tokens": totals[0][1], "transformers": transformers.__version__, "torch": torch.__version__}))


def parity(a: argparse.Namespace, rec) -> None:
    cmd = [sys.executable, "-m", "exporter", "parity", str(bundle_dir(a.precision)), "--reference", f"hf:{WORK / 'hf'}",
           "--json", *[x for t in a.tolerance for x in ("--tolerance", t)]]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=560)
    res: dict = {"command": " ".join(["enginekit", *cmd[3:]]), "rc": proc.returncode,
                 "seconds": round(time.perf_counter() - t, 1)}
    try:
        report = json.loads(proc.stdout)
        res.update(status=report.get("status"), failures=report.get("failures"), notes=report.get("notes"))
    except ValueError:
        res["log"] = proc.stdout[-1500:] + proc.stderr[-2500:]
    rec.put(f"parity_{a.precision}", res)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("phase", choices=["build", "bench", "parity", "runtime-child", "torch-child", "genai-child"])
    ap.add_argument("--out", type=Path, default=Path("/tmp/vlm8b-out"))
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "int4", "int8"])
    ap.add_argument("--mode", default="eager", choices=["eager", "compile"])
    ap.add_argument("--variants", default="enginekit,genai,eager,compile",
                    help="bench: which of enginekit,profile,genai,eager,compile to run (each in its own process)")
    ap.add_argument("--profile", action="store_true", help="runtime-child: profile one run (ORT's profiler)")
    ap.add_argument("--graph", action="store_true", help="genai-child: enable_cuda_graph; runtime-child: cuda_graph=True")
    ap.add_argument("--tolerance", action="append", default=[], help="parity: passed on to `enginekit parity`")
    a = ap.parse_args()
    if a.phase == "runtime-child":
        return runtime_child(a)
    if a.phase == "torch-child":
        return torch_child(a)
    if a.phase == "genai-child":
        return genai_child(a)
    a.out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    rec = record()
    try:
        {"build": build, "bench": bench, "parity": parity}[a.phase](a, rec)
    except Exception:
        rec.put(f"error_{a.phase}", traceback.format_exc()[-3000:])
    finally:
        shutil.copy(WORK / "vlm_bench.json", a.out / "vlm_bench.json")


if __name__ == "__main__":
    main()
