"""The GPU smoke: every GPU path of enginekit in one device call, on tiny models, in a few minutes.

    bash bench/gpu/session.sh smoke          # on the lent H200, after the wheels of bench/gpu/wheels.sh
    python bench/gpu/smoke.py --out /tmp/smoke --device cpu     # the same steps on a CPU (no BF16, no CUDA graphs)

Steps (each through the real `enginekit` CLI in a subprocess, as a user runs it):
  1. versions: torch, transformers, onnxruntime and its providers, the GPU
  2. a tiny BERT built --device cuda at fp32, fp16 and bf16, each gated on the GPU
  3. a tiny Qwen2 generation bundle: fp32 (enginekit's graphs on CUDA, GenAI on the CPU); on ONNX Runtime GenAI
     (the default): bf16, bf16 with PagedAttention and int4; the OpenAI server on the bf16 one (8 concurrent requests); on enginekit's own
     graphs (--generator enginekit): bf16 with --lowering native, both exporters (auto = transformers' own, torch =
     the generic wrapper); `enginekit generate` on the GenAI bf16 one
  4. tiny VLM bundles (vision engine + decoder graphs): Qwen2-VL fp32, Qwen2.5-VL fp16 (windowed attention),
     Qwen3-VL fp16 and bf16 (deepstack, interleaved M-RoPE)
  5. `enginekit bench` on the fp16 BERT bundle: the plain CUDA path and CUDA graph replay vs torch eager
  6. `pytest -m "gpu or trt"`
Every step's result goes to OUT/smoke.json as soon as it is known, and OUT/smoke.md is the summary; the
exit code is 1 when any step failed. Commit both under bench/results/ with the date.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

VLM_SHAPES = "image_height=84,image_width=56,images=1:1:4,batch=1:1:4,sequence=1:64:128,total_sequence=2:128:256"
QWEN25_VL_SHAPES = VLM_SHAPES.replace("image_height=84", "image_height=112")  # 2x1 windows of 56 px
QWEN3_VL_SHAPES = VLM_SHAPES.replace("image_height=84,image_width=56", "image_height=96,image_width=64")
LLM_SHAPES = "batch=1:2:8,sequence=1:16:64,total_sequence=2:64:128"


class Smoke:
    def __init__(self, out: Path, device: str):
        self.out, self.device = out, device
        self.results: dict = {"device": device, "command": " ".join(map(shlex.quote, sys.argv)), "steps": []}
        self.start = time.perf_counter()

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        (self.out / "smoke.json").write_text(json.dumps(self.results, indent=2, default=str) + "\n")

    def record(self, name: str, ok: bool, seconds: float, detail: str) -> None:
        self.results["steps"].append({"step": name, "ok": ok, "seconds": round(seconds, 1), "detail": detail})
        print(f"{'PASS' if ok else 'FAIL'}  {name}  ({seconds:.1f} s)  {detail}", flush=True)
        self.save()

    def run(self, name: str, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str] | None:
        """Run a command, keep its output in OUT/logs.txt (one file: the device returns at most 8)."""
        t = time.perf_counter()
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", COLUMNS="200")
        try:
            proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.record(name, False, time.perf_counter() - t, f"timed out after {timeout:.0f} s")
            return None
        with open(self.out / "logs.txt", "a") as log:
            log.write(f"\n===== {name}: {' '.join(map(shlex.quote, args))} (exit {proc.returncode})\n")
            log.write(proc.stdout[-20000:] + "\n--- stderr\n" + proc.stderr[-20000:] + "\n")
        proc.seconds = time.perf_counter() - t  # type: ignore[attr-defined]
        return proc

    def build(self, name: str, source: str, out: Path, *extra: str) -> dict | None:
        proc = self.run(name, [sys.executable, "-m", "exporter", "build", source, "--device", self.device, "-o", str(out),
                               "--force", "--json", *extra])
        if proc is None:
            return None
        if proc.returncode != 0:
            self.record(name, False, proc.seconds, _last_paragraph(proc.stderr))  # type: ignore[attr-defined]
            return None
        data = json.loads(proc.stdout)
        status = data["parity"]["status"]
        # On a GPU every gate must run for real: "not-checked" is a failure of the smoke.
        ok = status == "passed"
        exporter = data["manifest"].get("source", {}).get("exporter", "?")
        timings = ", ".join(f"{k} {v:.1f}" for k, v in data.get("timings_s", {}).items() if isinstance(v, (int, float)))
        self.record(name, ok, proc.seconds, f"parity {status}; {exporter}; s: {timings}")  # type: ignore[attr-defined]
        return data


def _last_paragraph(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " ".join(lines[-6:])[-1500:] if lines else "(no output)"


def versions(smoke: Smoke) -> None:
    code = ("import json, torch, transformers, onnx, onnxruntime as o, numpy\n"
            "print(json.dumps({'torch': torch.__version__, 'cuda': torch.cuda.is_available(), 'gpu': torch.cuda.get_device_name(0) "
            "if torch.cuda.is_available() else None, 'transformers': transformers.__version__, 'onnx': onnx.__version__, "
            "'onnxruntime': o.__version__, 'providers': o.get_available_providers(), 'numpy': numpy.__version__}))")
    proc = smoke.run("versions", [sys.executable, "-c", code])
    ok = proc is not None and proc.returncode == 0
    if ok:
        smoke.results["versions"] = json.loads(proc.stdout.strip().splitlines()[-1])
    smoke.record("versions", ok, proc.seconds if proc else 0, json.dumps(smoke.results.get("versions")) if ok
                 else _last_paragraph(proc.stderr if proc else ""))


def serve_openai(smoke: Smoke, bundle: Path) -> None:
    """`enginekit serve` of a generation bundle (the OpenAI API on GenAI's Engine): 8 concurrent greedy
    /v1/completions, each equal to its own sequential answer."""
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from bench.loadtest import serve_process

    t = time.perf_counter()
    prompts = ["The capital", "Once upon", "def f(x):", "Engines", "In a small", "The cat", "Paris is", "1 2 3"]
    try:
        with serve_process([sys.executable, "-m", "exporter", "serve", str(bundle), "--port", "0"], ready_timeout=180,
                           env=dict(os.environ)) as s:  # PYTHONPATH keeps /tmp/site (the carried wheels)
            def ask(p: str) -> str:
                body = json.dumps({"model": bundle.name, "prompt": p, "max_tokens": 16, "temperature": 0}).encode()
                req = urllib.request.Request(f"{s.url}/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=120) as r:  # raises on a status >= 400
                    return str(json.loads(r.read())["choices"][0]["text"])

            alone = [ask(p) for p in prompts]
            with ThreadPoolExecutor(8) as pool:
                together = list(pool.map(ask, prompts))
        ok = alone == together
        detail = "8 concurrent /v1/completions equal their sequential answers" if ok else f"{alone} != {together}"
    except Exception as exc:
        ok, detail = False, f"{type(exc).__name__}: {str(exc)[:500]}"
    smoke.record("serve (OpenAI API)", ok, time.perf_counter() - t, detail)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--skip-pytest", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logs.txt").write_text("")
    smoke = Smoke(args.out, args.device)
    cuda = args.device == "cuda"
    work = Path(os.environ.get("SMOKE_WORK", "/tmp/enginekit-smoke"))
    work.mkdir(parents=True, exist_ok=True)
    versions(smoke)

    from tests.models.causal import tiny_causal_lm
    from tests.models.encoders import tiny_bert
    from tests.models.vlm import tiny_qwen2_5_vl, tiny_qwen2_vl, tiny_qwen3_vl

    bert, qwen, vl = tiny_bert(work / "bert"), tiny_causal_lm(work / "qwen2", "qwen2"), tiny_qwen2_vl(work / "qwen2-vl")
    bundles = work / "bundles"
    for p in ["fp32", "fp16"] + (["bf16"] if cuda else []):
        smoke.build(f"bert {p}", f"hf:{bert}", bundles / f"bert-{p}", "--precision", p)
    # FP32: GenAI on the CPU; on CUDA enginekit's own graphs (GenAI's FP32 CUDA decoder does not load in
    # onnxruntime-gpu 1.31, found by this smoke on 2026-12-01)
    smoke.build("qwen2 generation fp32", f"hf:{qwen}", bundles / "qwen2-fp32", "--shapes", LLM_SHAPES)
    if cuda:
        smoke.build("qwen2 generation bf16 (genai)", f"hf:{qwen}", bundles / "qwen2-bf16-genai", "--precision", "bf16",
                    "--shapes", LLM_SHAPES)
        smoke.build("qwen2 generation bf16 paged (genai)", f"hf:{qwen}", bundles / "qwen2-bf16-paged", "--precision",
                    "bf16", "--genai-attention", "paged", "--shapes", LLM_SHAPES)
        # random tiny weights: int4's greedy tokens part from FP32's within a few steps (logits are still gated)
        smoke.build("qwen2 generation int4 (genai)", f"hf:{qwen}", bundles / "qwen2-int4-genai", "--precision", "int4",
                    "--shapes", LLM_SHAPES, "--tolerance", "tokens:equal=0")
        for exporter in ("auto", "torch"):
            smoke.build(f"qwen2 generation bf16 native (enginekit, {exporter})", f"hf:{qwen}",
                        bundles / f"qwen2-bf16-{exporter}", "--precision", "bf16", "--lowering", "native", "--exporter",
                        exporter, "--generator", "enginekit", "--shapes", LLM_SHAPES)
    gen = bundles / ("qwen2-bf16-genai" if cuda else "qwen2-fp32")
    if (gen / "manifest.json").is_file():
        proc = smoke.run("generate", [sys.executable, "-m", "exporter", "generate", str(gen), "-p", "The capital",
                                      "-p", "Once upon", "-n", "16", "--json"])
        if proc is not None:
            ok = proc.returncode == 0 and all(len(r["tokens"]) > 0 for r in json.loads(proc.stdout or "[]"))
            smoke.record("generate", ok, proc.seconds, (f"{[round(r['decode_tokens_per_s']) for r in json.loads(proc.stdout)]} "  # type: ignore[attr-defined]
                         "tok/s per prompt (tiny model)") if ok else _last_paragraph(proc.stderr))
    if (gen / "manifest.json").is_file():
        serve_openai(smoke, gen)
    smoke.build("qwen2-vl fp32", f"hf:{vl}", bundles / "qwen2-vl-fp32", "--shapes", VLM_SHAPES)
    vl25, vl3 = tiny_qwen2_5_vl(work / "qwen2.5-vl"), tiny_qwen3_vl(work / "qwen3-vl")
    smoke.build("qwen2.5-vl fp16", f"hf:{vl25}", bundles / "qwen2.5-vl-fp16", "--precision", "fp16",
                "--shapes", QWEN25_VL_SHAPES)
    # On CUDA these decoders are ONNX Runtime GenAI's builder's one graph (recipes/vlm_genai.py); fp16 on the CPU
    # keeps enginekit's two graphs
    for p in ["fp16"] + (["bf16", "int4"] if cuda else []):
        smoke.build(f"qwen3-vl {p}", f"hf:{vl3}", bundles / f"qwen3-vl-{p}", "--precision", p, "--shapes", QWEN3_VL_SHAPES)

    fp16 = bundles / "bert-fp16"
    if (fp16 / "manifest.json").is_file():
        bench_json = args.out / "bench-bert-fp16.json"
        proc = smoke.run("bench (cuda graphs)", [sys.executable, "-m", "exporter", "bench", str(fp16), "--batch", "1,8",
                                                 "--baseline", "eager", "--runs", "50", "--min-seconds", "0.3",
                                                 "-o", str(bench_json), "--json"], timeout=300)
        if proc is not None:
            detail, ok = _last_paragraph(proc.stderr), proc.returncode == 0
            if ok and bench_json.is_file():
                rows = json.loads(bench_json.read_text()).get("rows", [])
                graphed = [r for r in rows if "cuda-graph" in str(r.get("variant", ""))]
                ok = bool(graphed) or not cuda
                detail = "; ".join(f"{r.get('variant')} b{r.get('batch')} {r.get('p50_ms')} ms" for r in rows)
            smoke.record("bench (cuda graphs)", ok, proc.seconds, detail)  # type: ignore[attr-defined]

    if not args.skip_pytest:
        proc = smoke.run("pytest -m 'gpu or trt'", [sys.executable, "-m", "pytest", "-q", "-m", "gpu or trt",
                                                    "-p", "no:cacheprovider", "tests"], timeout=420)
        if proc is not None:
            tail = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
            failed_lines = [ln for ln in tail if ln.startswith(("FAILED", "ERROR"))]
            smoke.record("pytest -m 'gpu or trt'", proc.returncode == 0, proc.seconds,  # type: ignore[attr-defined]
                         " | ".join(failed_lines + tail[-1:])[-1500:])
    steps = smoke.results["steps"]
    failed = [s["step"] for s in steps if not s["ok"]]
    smoke.results["summary"] = f"{len(steps) - len(failed)} of {len(steps)} steps passed" + (f"; failed: {failed}" if failed else "")
    smoke.save()
    lines = [f"# GPU smoke ({args.device})", "", f"Command: `{smoke.results['command']}`", "",
             f"Versions: `{json.dumps(smoke.results.get('versions'))}`", "", "| step | result | seconds | detail |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {s['step']} | {'pass' if s['ok'] else 'FAIL'} | {s['seconds']} | {s['detail'].replace('|', '/')} |" for s in steps]
    lines += ["", f"{smoke.results['summary']} in {smoke.results['elapsed_s']} s."]
    (args.out / "smoke.md").write_text("\n".join(lines) + "\n")
    print(smoke.results["summary"], f"in {smoke.results['elapsed_s']} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
