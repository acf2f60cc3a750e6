"""Why the one-graph VLM decoder refused CUDA graph capture on onnxruntime-gpu 1.31 ("all compute graph nodes have
not been partitioned to the CUDAExecutionProvider", GPU smoke 2026-12-03, before the rewrite counted the sequence length on the device): which nodes ORT places on the CPU, in the
builder's raw graph and after enginekit's rewrite (exporter/export/vlm_decoder.py).

    python3 bench/gpu/vlm_graph_probe.py --out $OUT          # H200: tiny Qwen3-VL, BF16
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CHILD = """
import sys, onnxruntime as ort
so = ort.SessionOptions(); so.log_severity_level = 0
opts = {"enable_cuda_graph": sys.argv[2]}
try:
    ort.InferenceSession(sys.argv[1], so, providers=[("CUDAExecutionProvider", opts), "CPUExecutionProvider"])
    print("SESSION OK")
except Exception as exc:
    print("SESSION FAILED", str(exc)[:300])
"""


def placements(path: Path, graph: bool) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), "1" if graph else "0"], capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    cpu = [ln for ln in text.splitlines() if "CPUExecutionProvider" in ln and ("placed" in ln or "Node" in ln)]
    nodes = re.findall(r"\[CPUExecutionProvider\]\. Number of nodes: (\d+)", text)
    after = text.split("Node(s) placed on [CPUExecutionProvider]", 1)
    listed = [ln.strip() for ln in after[1].splitlines()[1:40] if ln.strip().startswith(" ") or "(" in ln][:40] \
        if len(after) > 1 else []
    return {"session": next((ln for ln in text.splitlines() if ln.startswith("SESSION")), "?"),
            "cpu_nodes": nodes, "cpu_lines": cpu[:10], "cpu_listed": listed}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    from exporter.export.genai import build_decoder
    from exporter.export.vlm_decoder import rewrite
    from runtimes.choices import Precision
    from runtimes.manifest import DimRange
    from tests.models.vlm import tiny_qwen3_vl

    work = Path("/tmp/vlm-graph-probe")
    shutil.rmtree(work, ignore_errors=True)
    hf = tiny_qwen3_vl(work / "hf")
    dims = {"batch": DimRange(1, 1, 2), "sequence": DimRange(1, 64, 128), "total_sequence": DimRange(2, 128, 256),
            "past_sequence": DimRange(1, 64, 255)}
    raw = work / "raw"
    build_decoder(hf, raw, work, Precision.BF16, "cuda", dims, 320, more_options={"exclude_embeds": "true"})
    done = work / "rewritten"
    shutil.copytree(raw, done)
    rewrite(done / "model.onnx", 2, 16)
    import onnx

    ops = sorted({(n.op_type, n.domain) for n in onnx.load(str(raw / "model.onnx"), load_external_data=False).graph.node})
    result = {"raw_ops": ops}
    for name, folder in (("raw", raw), ("rewritten", done)):
        for graph in (False, True):
            result[f"{name}_graph_{int(graph)}"] = placements(folder / "model.onnx", graph)
    (a.out / "vlm_graph_probe.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1)[:6000])


if __name__ == "__main__":
    main()
