"""Choose CUDA provider options for an ORT bundle by measuring them (recorded in the manifest).

Candidates: cuDNN's convolution algorithm search (EXHAUSTIVE tries every algorithm once per
shape, HEURISTIC trusts cuDNN's pick) and, for conv nets, NHWC layout (`prefer_nhwc`: tensor
cores prefer channels-last). Each candidate opens a session and is timed at the opt shape with
the same device-resident runner code the bench and the service use; the fastest wins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exporter.timing import measure
from runtimes.manifest import Manifest
from runtimes.samples import generate_feeds


def candidates(onnx_path: Path) -> list[dict[str, Any]]:
    import onnx

    convs = sum(1 for n in onnx.load(str(onnx_path), load_external_data=False).graph.node if n.op_type == "Conv")
    options: list[dict[str, Any]] = [{"cudnn_conv_algo_search": "EXHAUSTIVE"}]
    if convs >= 4:  # NHWC and the algorithm search only matter where convolutions carry the work
        options += [{"cudnn_conv_algo_search": "HEURISTIC"}, {"cudnn_conv_algo_search": "EXHAUSTIVE", "prefer_nhwc": 1}]
    return options


def tune_cuda(bundle: Path, manifest: Manifest, *, runs: int = 30) -> dict[str, Any]:
    """Time each candidate on `bundle`; returns {"chosen": options, "trials": [...]} (ms at opt)."""
    from runtimes.ort.runner import OrtRunner

    feeds = generate_feeds(manifest.io, "opt", seed=7)
    trials = []
    for options in candidates(bundle / manifest.target.engine_files[0]):
        runner = OrtRunner(bundle, manifest.hashed(bundle), device="cuda", provider_options=options)
        try:
            slot = runner.prepare(feeds)
            stats = measure(lambda slot=slot, runner=runner: runner.run_prepared(slot), warmup=5, runs=runs)
        finally:
            runner.close()
        trials.append({"options": options, "p50_ms": round(stats["p50_ms"], 4)})
    best = min(trials, key=lambda t: t["p50_ms"])
    return {"chosen": best["options"], "trials": trials, "shape": "opt"}
