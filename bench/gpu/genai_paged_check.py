"""Whether og.Generator runs a PagedAttention decoder (ONNX Runtime GenAI 0.18), on a tiny Qwen2 built for CUDA in
BF16 with `use_paged_attention=true`: greedy tokens at batch 1 and 3, get_logits, teacher forcing (append_tokens
after the prompt), against og.Engine's tokens on the same model.

    python3 bench/gpu/genai_paged_check.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench" / "gpu"))


def main() -> None:
    import numpy as np
    import onnxruntime_genai as og
    from genai_probe import build, model

    from tests.models.causal import tiny_causal_lm

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/out"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/paged-check")
    src = tiny_causal_lm(work / "qwen2", "qwen2")
    out: dict = {}

    def step(name, fn):
        try:
            out[name] = fn()
        except Exception as exc:
            out[name] = {"failed": f"{type(exc).__name__}: {str(exc)[:500]}", "tb": traceback.format_exc()[-800:]}
        print(name, json.dumps(out[name])[:600], flush=True)
        (args.out / "genai_paged_check.json").write_text(json.dumps(out, indent=2) + "\n")

    step("build", lambda: build(src, work / "paged", "cuda", "bf16", ["use_paged_attention=true", "max_batch_size=8",
                                                                          "gpu_utilization_factor=0.05"]))
    m = model(work / "paged", "cuda", False, None)
    prompts = [[5, 17, 33, 41, 9, 100], [7, 8, 9], [12, 13, 40]]

    def gen(batch, forced=None, n=8):
        p = og.GeneratorParams(m)
        width = max(map(len, batch))
        p.set_search_options(max_length=width + n, do_sample=False, batch_size=len(batch))
        g = og.Generator(m, p)
        ids = np.zeros((len(batch), width), np.int32)
        for r, x in enumerate(batch):
            ids[r, :len(x)] = x
        g.append_tokens(ids)
        toks, shapes = [], []
        for i in range(n):
            shapes.append(list(g.get_logits().shape))
            if forced:
                g.append_tokens(np.array([[forced[i]]], np.int32))
                toks.append(forced[i])
            else:
                g.generate_next_token()
                toks.append(g.get_next_tokens().tolist())
        return {"tokens": toks, "logits_shapes": shapes[:2]}

    def engine(batch, n=8):
        e = og.Engine(m)
        buf = e.create_event_buffer(64)
        reqs = []
        for x in batch:
            ro = og.RequestOptions()
            ro.set_max_session_tokens(len(x) + n)
            r = e.create_request(options=ro)
            t = og.TurnOptions(r)
            t.set_max_generated_tokens(n)
            t.set_do_sample(False)
            r.begin_turn(np.array(x, np.int32), t)
            reqs.append(r)
        got = {id(r): [] for r in reqs}
        while e.has_pending_requests():
            for ev in e.run(buf):
                if int(ev.flags.value) & int(og.EngineEventFlags.TOKEN.value):
                    got[id(ev.request)].append(int(ev.token))
        return [got[id(r)] for r in reqs]

    step("engine batch 3", lambda: engine(prompts))
    step("generator batch 1", lambda: [gen([p]) for p in prompts])
    step("generator batch 3", lambda: gen(prompts))
    step("generator teacher forcing", lambda: gen([prompts[0]], forced=[11, 12, 13, 14, 15, 16, 17, 18]))


if __name__ == "__main__":
    main()
