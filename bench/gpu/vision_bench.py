"""Issue 20 on the lent GPU, in two device calls: vision engines against torch.compile, the detector's
default gates, INT8 against FP16 on ORT CUDA, and the numerical noise of FP32 convolutions on cuDNN.

    export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
    python3 bench/gpu/vision_bench.py build --out $OUT     # builds + gates + INT8 timing + cuDNN noise (~7 min)
    python3 bench/gpu/vision_bench.py bench --out $OUT     # the same warm machine: enginekit bench of each (~8 min)
    python3 bench/gpu/vision_bench.py verify --out $OUT    # one call: BF16 detector, ResNet-50 retuned, profiles
    python bench/gpu/vision_bench.py build --out /tmp/v --device cpu --small   # a CPU rehearsal: tiny detector only

Models (random weights at real sizes; nothing can be downloaded there): CLIP ViT-L/14's image tower
(bench/gpu/make_models.py), timm's ResNet-50, and the YOLOX-S-sized detector with NMS in the graph
(exporter/yolox.py, 640×640, the layout DAMO-YOLO shares). Engines go to /tmp/vision-engines, which the
second call reads. Every stage's result goes to OUT/vision_<stage>.json as soon as it is known.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench" / "gpu"))

from recorder import Recorder  # noqa: E402  (bench/gpu/recorder.py)

ENGINES, MODELS = Path("/tmp/vision-engines"), Path("/tmp/vision-models")
DETECTOR = "py:exporter.yolox:make"
DEVICE = "cuda"
BUILDS = [  # name, source, precision, shapes, extra BuildOptions, seconds it needs (11-21 timings, rounded up)
    ("clip-l-vision-fp16", "clip", "fp16", "batch=1:8:32", {}, 80),
    ("detector-fp32", DETECTOR, "fp32", "batch=1:8:16", {}, 40),
    ("detector-fp16", DETECTOR, "fp16", "batch=1:8:16", {}, 60),
    ("detector-bf16", DETECTOR, "bf16", "batch=1:8:16", {}, 70),
    ("resnet50-fp16", "timm:resnet50", "fp16", "batch=1:8:32", {}, 50),
    ("resnet50-int8", "timm:resnet50", "int8", "batch=1:8:32", {"calib": "random:64"}, 90),
]


def summary(res) -> dict:
    m = res.manifest
    p = res.parity.summary()
    realised = m.precision.get("realised", {})
    return {"status": p["status"], "worst": p["worst"], "checks": p.get("checks"), "failures": p["failures"],
            "notes": p["notes"], "timings_s": res.timings, "fallback": m.precision.get("fallback"),
            "nodes_by_dtype": realised.get("nodes_by_dtype"), "inputs_cast_to_fp32": realised.get("inputs_cast_to_fp32"),
            "fp32_op_types": sorted({n["op"] for n in realised.get("fp32_nodes", [])}),
            "cuda_provider_options": m.target.options.get("cuda_provider_options"),
            "tuning": m.target.options.get("tuning"), "fusions": m.target.options.get("fusions"),
            "speed": (m.calibration or {}).get("speed"), "calibration_notes": (m.calibration or {}).get("notes")}


def build_one(name: str, source: str, precision: str, shapes: str, extra: dict) -> dict:
    from exporter.pipeline import BuildOptions, build
    from exporter.source.shapes import parse_shapes

    out = ENGINES / name
    try:
        res = build(source, BuildOptions(device=DEVICE, precision=precision, output=out, force=True,
                                         shapes=parse_shapes(shapes), **extra))
    except Exception as exc:
        report = out.with_name(out.name + ".rejected")
        found = {"error": f"{type(exc).__name__}: {str(exc)[:1500]}"}
        for f in ("parity.json", "manifest.json"):
            if (report / f).is_file():
                found[f] = json.loads((report / f).read_text())
        if "manifest.json" in found:
            m = found.pop("manifest.json")
            found["speed"] = (m.get("calibration") or {}).get("speed")
            found["calibration_notes"] = (m.get("calibration") or {}).get("notes")
        if "parity.json" in found:
            p = found.pop("parity.json")
            found["failures"] = [f for c in p.get("cases", []) for o in c.get("outputs", []) for f in o.get("failures", [])][:8]
        return found
    return summary(res)


def cudnn_noise() -> dict:
    """rel-L2 of the detector's FP32 raw outputs (opt batch) between torch runs that pick other cuDNN
    algorithms (heuristic, benchmark search, no cuDNN, TF32), and of ORT FP32 sessions of the same engine
    (the engine's own options, ORT's defaults with TF32, cuDNN's default algorithm) against torch."""
    import numpy as np
    import torch

    from exporter.export.detector import with_raw_outputs
    from exporter.gate.parity import Tolerance, compare_output
    from exporter.source.loading import load_source
    from exporter.source.spec import parse_source, run_torch
    from runtimes.manifest import Manifest
    from runtimes.samples import generate_feeds

    bundle = ENGINES / "detector-fp32"
    if not bundle.is_dir():
        bundle = ENGINES / "detector-fp32.rejected"
    m = Manifest.read(bundle)
    loaded = load_source(parse_source(DETECTOR))
    feeds = generate_feeds(m.io, "opt", seed=1)
    names = ["raw_boxes", "raw_scores"]

    def torch_run(benchmark: bool = False, enabled: bool = True, tf32: bool = False) -> dict:
        saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.enabled
        torch.backends.cudnn.benchmark, torch.backends.cudnn.enabled = benchmark, enabled
        try:
            if not tf32:
                return run_torch(loaded.module, loaded.io, feeds, device="cuda")
            torch.backends.cudnn.allow_tf32 = True
            args = tuple(torch.from_numpy(np.asarray(feeds[s.name])).cuda() for s in loaded.io.inputs)
            with torch.inference_mode():
                outs = loaded.module.cuda()(*args)
            return {n: o.float().cpu().numpy() for n, o in zip(loaded.module.output_names, outs)}
        finally:
            torch.backends.cudnn.benchmark, torch.backends.cudnn.enabled = saved

    if DEVICE != "cuda":
        return {"skipped": "no GPU"}
    reference = torch_run()
    variants = {"torch cudnn.benchmark (searched algorithms)": torch_run(benchmark=True),
                "torch without cuDNN (native kernels)": torch_run(enabled=False),
                "torch with TF32 convolutions": torch_run(tf32=True)}
    engine_opts = {"device_id": 0, "use_tf32": 0, **m.target.options.get("cuda_provider_options", {})}
    for label, opts in {"ORT, the engine's options (TF32 off)": engine_opts,
                        "ORT defaults (TF32 on)": {"device_id": 0},
                        "ORT TF32 off, cuDNN default algorithm": {"device_id": 0, "use_tf32": 0, "cudnn_conv_algo_search": "DEFAULT"},
                        }.items():
        run, note = with_raw_outputs(lambda f: {}, bundle / m.target.engine_files[0], names, "cuda", opts)
        variants[label] = run(feeds) if note is None else {}
    table = {}
    for label, out in variants.items():
        table[label] = {n: float(compare_output(n, reference[n], out[n], Tolerance()).rel_l2) for n in names if n in out}
    return {"feeds": {k: list(v.shape) for k, v in feeds.items()}, "reference": "torch FP32, cuDNN heuristic algorithms, TF32 off",
            "rel_l2_vs_reference": table}


def stage_build(rec: Recorder) -> None:
    from make_models import make_clip_vision

    needs_clip = any(source == "clip" for _, source, *_ in BUILDS)
    clip = rec.stage("make clip", lambda: make_clip_vision(MODELS), 30) if needs_clip else None
    for name, source, precision, shapes, extra, need in BUILDS:
        if source == "clip":
            if clip is None:
                continue
            source = f"hf:{clip}"
        rec.data["rows"].append({"build": name})
        result = rec.stage(f"build {name}", lambda s=source, p=precision, sh=shapes, e=extra, n=name: build_one(n, s, p, sh, e), need)
        rec.data["rows"][-1].update(result or {})
        rec.save()
        if name == "detector-bf16":
            noise = rec.stage("cudnn noise", cudnn_noise, 30)
            if noise:
                rec.data["cudnn_noise"] = noise
                rec.save()


def stage_bench(rec: Recorder, out: Path) -> None:
    from exporter.bench import BenchOptions, run_bench, save

    plans = [  # name, bundles, batches, eager dtypes, compile dtype, seconds it needs
        ("clip-l-vision", ["clip-l-vision-fp16"], [1, 32], ["fp32", "fp16"], "fp16", 150),
        ("resnet50", ["resnet50-fp16", "resnet50-int8"], [1, 32], ["fp32", "fp16"], "fp16", 100),
        ("detector", ["detector-fp16", "detector-bf16"], [1, 16], ["fp32", "fp16", "bf16"], "bf16", 140),
    ]
    for name, names, batches, eager, compile_dtype, need in plans:
        bundles = [ENGINES / n for n in names if (ENGINES / n).is_dir()]
        if not bundles:
            rec.data["notes"].append(f"{name}: no bundle was built")
            continue
        opts = BenchOptions(batches=batches, baselines=["eager", "compile"], eager_dtypes=eager,
                            compile_modes=["default", "reduce-overhead"], compile_dtype=compile_dtype,
                            runs=50, warmup=10, min_seconds=0.5, cuda_graph=True)
        path = out / f"bench-{name}.json"
        command = f"vision_bench.py bench: run_bench({[b.name for b in bundles]}, {opts})"

        def one(bundles=bundles, opts=opts, path=path, command=command) -> dict:
            result = run_bench(bundles, opts, checkpoint=lambda partial: save(partial, path, None, command))
            save(result, path, None, command)
            return {"rows": [{k: r[k] for k in ("variant", "batch", "p50_ms", "memory_mib", "vs_compile")}
                             for r in result["rows"]], "slower_than_compile": result["slower_than_compile"],
                    "notes": result["notes"]}

        got = rec.stage(f"bench {name}", one, need)
        if got:
            rec.data[f"bench {name}"] = got
            rec.save()
    if (ENGINES / "resnet50-fp16").is_dir():  # where ResNet-50 spends its time at batch 32 (ORT and torch.compile)
        import subprocess

        rec.stage("profile resnet50 b32", lambda: {"rc": subprocess.run(
            [sys.executable, str(ROOT / "bench/gpu/kernel_profile.py"), str(ENGINES / "resnet50-fp16"), "32"],
            env=dict(os.environ, OUT=str(out)), timeout=max(30, rec.left()), capture_output=True).returncode}, 80)


def stage_verify(rec: Recorder, out: Path) -> None:
    """One call on a fresh machine (12-02): what the first two calls left open. The BF16 detector's gate after the
    Clip fix, ResNet-50 rebuilt with the fuse_conv_bias tuning candidate and benched at batch 1 and 32 against
    torch.compile, the BF16 detector's row of the DAMO-YOLO table, and CUPTI kernel profiles of ResNet-50 and CLIP-L
    at batch 32 (where they trail or barely lead torch.compile)."""
    from make_models import make_clip_vision

    wanted = ["detector-bf16", "resnet50-fp16", "clip-l-vision-fp16"]  # in this order: the cheap, open ones first
    for name, source, precision, shapes, extra, need in sorted((b for b in BUILDS if b[0] in wanted),
                                                               key=lambda b: wanted.index(b[0])):
        if source == "clip":
            clip = rec.stage("make clip", lambda: make_clip_vision(MODELS), 30)
            if clip is None:
                continue
            source = f"hf:{clip}"
        rec.data["rows"].append({"build": name})
        rec.data["rows"][-1].update(rec.stage(f"build {name}", lambda s=source, p=precision, sh=shapes, e=extra, n=name:
                                              build_one(n, s, p, sh, e), need) or {})
        rec.save()
        if name == "resnet50-fp16" and (ENGINES / name).is_dir():
            profile(rec, out, name)
            bench_one(rec, out, "resnet50", [ENGINES / name], [1, 32], ["fp16"], "fp16", ["default", "reduce-overhead"], 110)
        if name == "detector-bf16" and (ENGINES / name).is_dir():
            bench_one(rec, out, "detector-bf16", [ENGINES / name], [1, 16], ["fp32"], "bf16", [], 60)
    if (ENGINES / "clip-l-vision-fp16").is_dir():
        profile(rec, out, "clip-l-vision-fp16")


def profile(rec: Recorder, out: Path, name: str) -> None:
    import subprocess

    rec.stage(f"profile {name} b32", lambda: {"rc": subprocess.run(
        [sys.executable, str(ROOT / "bench/gpu/kernel_profile.py"), str(ENGINES / name), "32"],
        env=dict(os.environ, OUT=str(out)), timeout=max(30, rec.left()), capture_output=True).returncode}, 70)


def bench_one(rec: Recorder, out: Path, name: str, bundles: list[Path], batches: list[int], eager: list[str],
              compile_dtype: str, modes: list[str], need: float) -> None:
    from exporter.bench import BenchOptions, run_bench, save

    opts = BenchOptions(batches=batches, baselines=["eager", "compile"] if modes else ["eager"], eager_dtypes=eager,
                        compile_modes=modes or ["default"], compile_dtype=compile_dtype, runs=50, warmup=10,
                        min_seconds=0.5, cuda_graph=True)
    path = out / f"bench-{name}.json"
    command = f"vision_bench.py verify: run_bench({[b.name for b in bundles]}, {opts})"

    def one() -> dict:
        result = run_bench(bundles, opts, checkpoint=lambda partial: save(partial, path, None, command))
        save(result, path, None, command)
        return {"rows": [{k: r[k] for k in ("variant", "batch", "p50_ms", "memory_mib", "vs_compile")}
                         for r in result["rows"]], "slower_than_compile": result["slower_than_compile"]}

    got = rec.stage(f"bench {name}", one, need)
    if got:
        rec.data[f"bench {name}"] = got
        rec.save()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=["build", "bench", "verify"])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    ap.add_argument("--budget-s", type=float, default=540.0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="the tiny detector only (a CPU rehearsal of the steps)")
    args = ap.parse_args()
    global DEVICE, DETECTOR, BUILDS
    DEVICE = args.device
    if args.small:
        DETECTOR = "py:exporter.yolox:make_tiny"
        BUILDS = [("detector-fp32", DETECTOR, "fp32", "batch=1:2:4", {}, 30), ("detector-fp16", DETECTOR, "fp16", "batch=1:2:4", {}, 40)]
    from exporter.cli import _quiet_libraries

    _quiet_libraries()
    rec = Recorder(args.out / f"vision_{args.stage}.json", args.budget_s)
    if args.stage == "build":
        stage_build(rec)
    elif args.stage == "verify":
        stage_verify(rec, args.out)
    else:
        stage_bench(rec, args.out)
    print(json.dumps({k: v["status"][:120] for k, v in rec.data["stages"].items()}, indent=1))


if __name__ == "__main__":
    main()
