"""The one-graph VLM decoder's decode speed with and without CUDA graph capture on a tiny Qwen3-VL (random weights,
3 layers: a decode step is almost all kernel launches, what capture removes), built BF16 --device cuda here.

    python3 bench/gpu/vlm_graph_tiny.py --out $OUT

One image + 20 text tokens -> 64 greedy tokens; 2 warm-up runs, median of 7; both generators in this process, so
also: their tokens equal.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/vlm-graph-tiny"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    from exporter.gate.vision_language import gate_photos
    from exporter.pipeline import BuildOptions, build
    from exporter.source.shapes import parse_shapes
    from runtimes.generate import SamplingOptions, load_generator
    from tests.conftest import QWEN3_VL_SHAPES
    from tests.models.vlm import tiny_qwen3_vl

    bundle = a.work / "bundle"
    if not (bundle / "manifest.json").is_file():
        build(f"hf:{tiny_qwen3_vl(a.work / 'hf')}", BuildOptions(output=bundle, device="cuda", precision="bf16",
                                                                  shapes=parse_shapes(QWEN3_VL_SHAPES)))
    result: dict = {"command": "python3 bench/gpu/vlm_graph_tiny.py " + " ".join(sys.argv[1:])}
    opts = SamplingOptions(max_new_tokens=64, stop_token_ids=[])
    tokens = {}
    for graph in (True, False):
        with load_generator(bundle, cuda_graph=graph) as g:
            spec = g.vision
            ids = [spec.vision_start_token_id, *[spec.image_token_id] * spec.tokens_per_image, spec.vision_end_token_id,
                   *range(20, 40)]
            enc = g.encode_images_all(gate_photos(spec)[:1])
            runs = [g.generate_ids([ids], opts, **enc)[0] for _ in range(9)][2:]
            name = "cuda_graph" if graph else "no_graph"
            tokens[name] = runs[0].tokens
            result[name] = {"captured": g.cuda_graph, "ttft_ms": round(statistics.median(r.ttft_ms for r in runs), 3),
                            "decode_tok_s": round(statistics.median(r.tokens_per_s for r in runs), 1),
                            "tokens_same_every_run": all(r.tokens == runs[0].tokens for r in runs)}
    result["tokens_equal"] = tokens["cuda_graph"] == tokens["no_graph"]
    (a.out / "vlm_graph_tiny.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
