"""Kernel-level profile (CUPTI through torch.profiler, which records every CUDA kernel in the process,
ONNX Runtime's included) of an ORT engine and of torch.compile on the same inputs; and, optionally,
torch.compile max-autotune timing. Writes JSON to $OUT as it goes.

    python bench/gpu/kernel_profile.py engines/clip-l-vision-ort-fp16 32 [max-autotune]
"""

import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import runtimes
from exporter.bench import batch_feeds
from exporter.source.loading import load_source
from exporter.source.spec import parse_source
from exporter.timing import measure
from runtimes.manifest import Manifest

bundle, batch = Path(sys.argv[1]), int(sys.argv[2])
extra = sys.argv[3:]
out = Path(os.environ.get("OUT", "/tmp")) / f"kernels-{bundle.name}-b{batch}.json"
m = Manifest.read(bundle)
feeds = batch_feeds(m.io, batch, 0)
result: dict = {"bundle": bundle.name, "batch": batch}


def top_kernels(prof, runs):
    rows = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0) > 0:
            t = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
            if t > 0:
                rows[e.key[:120]] = rows.get(e.key[:120], 0) + t / 1000.0 / runs
    total = sum(rows.values())
    top = sorted(rows.items(), key=lambda kv: -kv[1])[:15]
    return {"gpu_ms_per_run": round(total, 3), "top": [(k, round(v, 4), round(v / total, 3)) for k, v in top]}


def save():
    out.write_text(json.dumps(result, indent=1))


with runtimes.load(bundle, cuda_graph=False) as r:
    slot = r.prepare(feeds)
    for _ in range(10):
        r.run_prepared(slot)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            r.run_prepared(slot)
        torch.cuda.synchronize()
    result["ort"] = top_kernels(prof, 10)
    save()

loaded = load_source(parse_source(m.source["spec"]))
model = loaded.module.to("cuda", dtype=torch.float16).eval()
args = tuple(torch.from_numpy(feeds[s.name]).to("cuda", torch.float16) for s in m.io.inputs)
modes = ["reduce-overhead"] + [x for x in extra if x != "reduce-overhead"]
for mode in modes:
    torch._dynamo.reset()
    t0 = time.perf_counter()
    fn = torch.compile(model, mode=mode, dynamic=False)
    with torch.inference_mode():
        fn(*args)
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0

        def call(fn=fn):
            fn(*args)
            torch.cuda.synchronize()

        stats = measure(call, warmup=10, runs=50, min_seconds=1)
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                fn(*args)
            torch.cuda.synchronize()
    result[f"torch.compile {mode}"] = {"p50_ms": round(stats["p50_ms"], 4), "compile_s": round(compile_s, 1),
                                       **top_kernels(prof, 10)}
    save()
print(json.dumps(result, indent=1)[:6000])
