"""The seed systems on the lent GPU, in one call: CLIP ViT-L/14 (both towers, zero-shot bundle) and a
YOLOX-S-sized detector with NMS in the graph, each built and gated through the ORT CUDA path, then a
short bench of the engines against torch eager. Random weights at real sizes (nothing can be
downloaded there): the models are made here from their configs.

    export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1; python3 bench/gpu/seeds.py --out $OUT
    python bench/gpu/seeds.py --out /tmp/seeds --device cpu --small      # the same steps, tiny, on a CPU

Every step's result (or its error) goes to OUT/seeds.json as soon as it is known, and a step is
skipped when the time budget (--budget-s, default 540 s) would be exceeded, so the call ends well
inside the device's 10 minutes with whatever it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# openai/clip-vit-large-patch14: vision 24×1024 (patch 14, 224 px), text 12×768 (77 tokens), projection 768.
CLIP_L = {
    "text_config": {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu"},
    "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                      "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "hidden_act": "quick_gelu"},
    "projection_dim": 768,
}
CLIP_TINY = {
    "text_config": {"vocab_size": 99, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                    "num_attention_heads": 2, "max_position_embeddings": 16},
    "vision_config": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37,
                      "num_hidden_layers": 2, "num_attention_heads": 2},
    "projection_dim": 16,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny models (a CPU smoke run of the same steps)")
    ap.add_argument("--budget-s", type=float, default=540.0)
    ap.add_argument("--only", choices=["clip", "detector"], help="one of the two systems (a shorter call)")
    ap.add_argument("--precisions", default=None, help="comma list (default fp32,fp16 and bf16 on cuda)")
    ap.add_argument("--detector-tolerance", action="append", default=[],
                    help="--tolerance for the detector builds (random weights: recorded with the results)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results: dict = {"device": args.device, "small": args.small, "steps": {}}

    def save() -> None:
        results["elapsed_s"] = round(time.perf_counter() - start, 1)
        (args.out / "seeds.json").write_text(json.dumps(results, indent=2, default=str) + "\n")

    def step(name: str, estimate_s: float, fn) -> object:
        if time.perf_counter() - start + estimate_s > args.budget_s:
            results["steps"][name] = {"skipped": f"time budget ({args.budget_s:.0f} s) would be exceeded"}
            save()
            return None
        t0 = time.perf_counter()
        print(f"[{time.perf_counter() - start:6.1f} s] {name}", flush=True)
        try:
            value = fn()
            results["steps"][name] = {"seconds": round(time.perf_counter() - t0, 1), **(value or {})}
        except Exception as exc:
            results["steps"][name] = {"seconds": round(time.perf_counter() - t0, 1), "error": f"{type(exc).__name__}: {exc}"[:2000],
                                      "traceback": traceback.format_exc()[-3000:]}
            value = None
        save()
        return value

    from exporter.cli import _quiet_libraries

    _quiet_libraries()
    import torch

    results["environment"] = {"torch": torch.__version__, "cuda": torch.cuda.is_available() and torch.cuda.get_device_name(0)}
    models = Path("/tmp/seeds-models") if not args.small else args.out / "models"
    engines = Path("/tmp/seeds-engines") if not args.small else args.out / "engines"

    def make_clip() -> dict:
        from transformers import CLIPConfig, CLIPModel

        torch.manual_seed(0)
        model = CLIPModel(CLIPConfig(**(CLIP_TINY if args.small else CLIP_L))).eval()
        model.save_pretrained(models / "clip")
        return {"parameters_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}

    if args.only != "detector":
        step("make clip", 60, make_clip)
    from exporter.pipeline import BuildOptions, build
    from exporter.source.shapes import parse_shapes

    precisions = (args.precisions.split(",") if args.precisions
                  else ["fp32", "fp16"] + (["bf16"] if args.device == "cuda" else []))
    results["tolerances"] = {"detector": args.detector_tolerance}
    built: dict[str, list[Path]] = {"clip": [], "detector": []}

    def build_one(kind: str, source: str, precision: str, shapes: str | None) -> dict:
        out = engines / f"{kind}-{precision}"
        tolerances = args.detector_tolerance if kind == "detector" else []
        try:
            res = build(source, BuildOptions(device=args.device, precision=precision, output=out, force=True,
                                             shapes=parse_shapes(shapes) if shapes else {}, tolerances=tolerances))
        except Exception:
            report = out.with_name(out.name + ".rejected") / "parity.json"
            if report.is_file():  # a failed gate: keep its measured numbers with the error
                rejected = json.loads(report.read_text())
                results.setdefault("rejected", {})[f"{kind} {precision}"] = {
                    k: rejected.get(k) for k in ("worst", "failures", "notes", "checks")}
            raise
        built[kind].append(out)
        summary = res.parity.summary()
        return {"status": summary["status"], "timings_s": res.timings, "worst": summary["worst"],
                "checks": summary.get("checks"), "notes": summary["notes"], "failures": summary["failures"],
                "bundle": str(out), "precision": res.manifest.precision}

    clip_shapes = None if args.small else "batch=1:8:32,sequence=1:77:77"
    for p in precisions if args.only != "detector" else []:
        step(f"build clip {p}", 60 if p == "fp32" else 110, lambda p=p: build_one("clip", f"hf:{models / 'clip'}", p, clip_shapes))
    detector = "py:exporter.yolox:make_tiny" if args.small else "py:exporter.yolox:make"
    for p in precisions if args.only != "clip" else []:
        step(f"build detector {p}", 40 if p == "fp32" else 70, lambda p=p: build_one("detector", detector, p, "batch=1:8:32"))

    from exporter.bench import BenchOptions, run_bench

    def bench(kind: str) -> dict:
        opts = BenchOptions(batches=[1, 8], baselines=["eager"], eager_dtypes=["fp32", "fp16"] if args.device == "cuda" else ["fp32"],
                            runs=30, warmup=5, min_seconds=0.3, cuda_graph=False)
        result = run_bench(built[kind], opts)
        (args.out / f"bench-{kind}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        return {"rows": [{k: r[k] for k in ("variant", "batch", "p50_ms", "throughput", "speedup")} for r in result["rows"]],
                "notes": result["notes"]}

    for kind, need in (("clip", 60), ("detector", 40)):
        if args.only in (None, kind) and built[kind]:
            step(f"bench {kind}", need, lambda kind=kind: bench(kind))
    print(json.dumps({k: v.get("status", v.get("error", v.get("skipped", "ok"))) for k, v in results["steps"].items()}, indent=1))


if __name__ == "__main__":
    main()
