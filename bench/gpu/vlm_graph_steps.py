"""Why a CUDA-graph-captured decode loop of the one-graph VLM decoder gave other tokens than the uncaptured loop (issue
19, 2026-12-03, tiny Qwen3-VL BF16 on the H200; cause not found then). This replays the SAME per-step feeds (those the
runtime fed in a plain greedy run, recorded) through raw ONNX Runtime sessions in several ways and reports, per way,
the first step whose next_token differs from the runtime's and the largest logit difference per step:

  plain-static     no CUDA graph; decode inputs in fixed device buffers updated in place, the attention mask padded
                   to the cache length (what capture needs: one shape, one address), outputs preallocated
  graph            the same on a session with enable_cuda_graph (decode steps gpu_graph_id 1, the prefill -1)
  graph-pause      graph, with 5 ms between the in-place input updates and the run (an H2D copy from pageable memory
                   returns before its DMA lands; a replay on ORT's own stream need not wait for it)
  graph-rebind     graph, the decode inputs bound again before each run
  graph-split      the prefill on the plain session, only the decode steps on the graph session (same cache buffers)

    python3 bench/gpu/vlm_graph_steps.py --out $OUT [--bundle DIR]   # default: the GPU smoke's qwen3-vl-bf16 bundle
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

NEW = 24
DEVICE = "cuda"  # --device cpu: the plain-static way alone (a check of this script where no GPU is)


def record_feeds(bundle: Path) -> tuple[object, list[dict], list[int], np.ndarray, int]:
    """The runtime's own greedy run on CUDA: (generator, per-step host feeds, tokens, logits [steps, vocab], length)."""
    from exporter.gate.vision_language import gate_photos
    from runtimes import onegraph
    from runtimes.generate import SamplingOptions, load_generator

    gen = load_generator(bundle, device=DEVICE, verify=False, cuda_graph=False)
    feeds: list[dict] = []
    plain_run = onegraph.OneGraphSteps.run

    def run(self, host, want_logits, decode):
        feeds.append({k: np.array(v, copy=True) for k, v in host.items()})
        return plain_run(self, host, want_logits, decode)

    onegraph.OneGraphSteps.run = run
    spec = gen.vision
    ids = [spec.vision_start_token_id, *[spec.image_token_id] * spec.tokens_per_image, spec.vision_end_token_id,
           *range(20, 40)]
    out = gen.generate_ids([ids], SamplingOptions(max_new_tokens=NEW, stop_token_ids=[]), images=[gate_photos(spec)[:1]],
                           record_logits=True)[0]
    onegraph.OneGraphSteps.run = plain_run
    return gen, feeds, out.tokens, np.stack(out.logits), gen._one.key[1]  # logits: one [vocab] row per step


def replay(gen, session, prefill_session, feeds, length: int, graph: bool, pause: float, rebind: bool) -> dict:
    import onnxruntime as ort

    from runtimes.onegraph import ONNX_TYPES

    batch = feeds[0]["inputs_embeds"].shape[0]
    specs = gen._one.specs
    cache = {n: ort.OrtValue.ortvalue_from_shape_and_type([batch, int(specs[n].shape[1]), length, int(specs[n].shape[3])],
                                                          ONNX_TYPES[specs[n].dtype], DEVICE, 0) for n in gen.cache_in}

    def bind_cache(b):
        for past, present in zip(gen.cache_in, gen.cache_out):
            b.bind_ortvalue_input(past, cache[past])
            b.bind_ortvalue_output(present, cache[past])

    tokens, logits = [], []
    # the prefill: host inputs, a fresh binding, no graph
    host = feeds[0]
    b = prefill_session.io_binding()
    for k, v in host.items():
        b.bind_cpu_input(k, np.ascontiguousarray(v))
    b.bind_output("logits", "cpu")
    b.bind_output("next_token", "cpu")
    bind_cache(b)
    ro = ort.RunOptions()
    if graph and prefill_session is session:
        ro.add_run_config_entry("gpu_graph_id", "-1")
    prefill_session.run_with_iobinding(b, ro)
    out = b.get_outputs()
    logits.append(out[0].numpy().reshape(batch, -1)[0])
    tokens.append(int(out[1].numpy().reshape(-1)[0]))
    # the decode steps: fixed device buffers, the mask padded to the cache length
    first = feeds[1]
    dev = {}
    for k, v in first.items():
        shape = (batch, length) if k == "attention_mask" else v.shape
        dev[k] = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, v.dtype), DEVICE, 0)
    logit_shape = [batch, 1, out[0].numpy().shape[-1]]
    out_logits = ort.OrtValue.ortvalue_from_shape_and_type(logit_shape, np.float32, DEVICE, 0)
    out_next = ort.OrtValue.ortvalue_from_shape_and_type([batch, 1], np.int64, DEVICE, 0)
    b = session.io_binding()
    b.bind_ortvalue_output("logits", out_logits)
    b.bind_ortvalue_output("next_token", out_next)
    for k, v in dev.items():
        b.bind_ortvalue_input(k, v)
    bind_cache(b)
    ro = ort.RunOptions()
    if graph:
        ro.add_run_config_entry("gpu_graph_id", "1")
    for host in feeds[1:]:
        for k, v in host.items():
            if k == "attention_mask":
                v = np.pad(v, ((0, 0), (0, length - v.shape[1])))
            dev[k].update_inplace(np.ascontiguousarray(v))
        if pause:
            time.sleep(pause)
        if rebind:
            for k, v in dev.items():
                b.bind_ortvalue_input(k, v)
        session.run_with_iobinding(b, ro)
        logits.append(np.array(out_logits.numpy().reshape(batch, -1)[0], copy=True))  # a CPU value is a view
        tokens.append(int(out_next.numpy().reshape(-1)[0]))
    return {"tokens": tokens, "logits": np.stack(logits)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--bundle", type=Path, default=Path("/tmp/enginekit-smoke/bundles/qwen3-vl-bf16"))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    a = ap.parse_args()
    global DEVICE
    DEVICE = a.device
    a.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"command": "python3 bench/gpu/vlm_graph_steps.py " + " ".join(sys.argv[1:]), "bundle": str(a.bundle)}
    path = a.out / "vlm_graph_steps.json"
    try:
        gen, feeds, ref_tokens, ref_logits, length = record_feeds(a.bundle)
        result.update(steps=len(feeds), cache_length=length, runtime_tokens=ref_tokens,
                      feeds=sorted(feeds[1]) if len(feeds) > 1 else [])
        runner = gen._runners[gen.stages["decode"]]
        session = runner._session  # the runtime's own session options; graph=True adds enable_cuda_graph
        plain = session(graph=False)
        ways = {"plain-static": (False, 0.0, False, False), "graph": (True, 0.0, False, False),
                "graph-pause": (True, 0.005, False, False), "graph-rebind": (True, 0.0, True, False),
                "graph-split": (True, 0.0, False, True)}
        for name, (graph, pause, rebind, split) in ways.items():
            if graph and DEVICE != "cuda":
                continue
            try:
                s = session(graph=True) if graph else plain
                got = replay(gen, s, plain if split else s, feeds, length, graph, pause, rebind)
                diff = np.abs(got["logits"] - ref_logits[: len(got["logits"])]).max(axis=-1)
                result[name] = {
                    "first_token_difference": next((i for i, (x, y) in enumerate(zip(got["tokens"], ref_tokens)) if x != y), None),
                    "max_logit_difference_per_step": [round(float(d), 5) for d in diff],
                    "tokens": got["tokens"]}
            except Exception:
                result[name] = {"error": traceback.format_exc()[-1500:]}
            path.write_text(json.dumps(result, indent=1))
    except Exception:
        result["error"] = traceback.format_exc()[-3000:]
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: (v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items() if kk != "tokens"})
                      for k, v in result.items()}, indent=1)[:5000])


if __name__ == "__main__":
    main()
