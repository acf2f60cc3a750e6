"""How far transformers' OWN BF16 model lies from its FP32 model on the VLM gate's cases, at Qwen3-VL-8B's geometry with
random weights (issue 19): the evidence for the BF16 bound the 8B gate is judged by. The gate compares the bundle's
teacher-forced logits with transformers FP32's generate() logits (rel-L2 over all steps, bound 0.03 for bf16); this
measures the same metric for transformers BF16 itself (the same weights, rounded to BF16 as the bundle's are), teacher
forced on the FP32 tokens. If BF16 storage alone already exceeds 0.03 on a case, no BF16 engine can pass it there.

    python3 bench/gpu/vlm_bf16_floor.py --out $OUT     # the folder of vlm_bench.py build (/tmp/vlm8b/hf)

Both models on the GPU (FP32 35 GB + BF16 17.5 GB); TF32 off, sdpa attention.
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


def forced_logits(model, ids: list[int], tokens: list[int], extra: dict) -> np.ndarray:
    """Logits [steps, vocab] for predicting tokens[k] after ids + tokens[:k] (one forward of the whole sequence)."""
    import torch

    seq = torch.tensor([ids + tokens[:-1]], device="cuda")
    kw = {k: (v.to("cuda") if hasattr(v, "to") else v) for k, v in extra.items()}
    if "mm_token_type_ids" in kw:
        kw["mm_token_type_ids"] = (seq == int(model.config.image_token_id)).int()
    if "pixel_values" in kw:
        kw["pixel_values"] = kw["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        out = model(input_ids=seq, attention_mask=torch.ones_like(seq), **kw)
    return out.logits[0, len(ids) - 1:].float().cpu().numpy()


def metrics(ref: np.ndarray, got: np.ndarray) -> dict:
    a, b = got.ravel().astype(np.float64), ref.ravel().astype(np.float64)
    return {"rel_l2": round(float(np.linalg.norm(a - b) / np.linalg.norm(b)), 5),
            "cosine": round(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))), 6),
            "argmax": round(float((got.argmax(-1) == ref.argmax(-1)).mean()), 4),
            "per_step_rel_l2_max": round(float(max(np.linalg.norm(g - r) / np.linalg.norm(r) for g, r in zip(got, ref))), 5)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--folder", type=Path, default=Path("/tmp/vlm8b/hf"))
    ap.add_argument("--steps", type=int, default=32)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "vlm_bf16_floor.json"
    result: dict = {"command": "python3 bench/gpu/vlm_bf16_floor.py " + " ".join(sys.argv[1:]), "cases": []}
    try:
        import torch
        import transformers

        from exporter.gate.tokens import reference_generate
        from exporter.gate.vision_language import CASES, gate_photos, reference_inputs
        from runtimes.vlm import VisionSpec

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        t = time.perf_counter()
        cls = transformers.AutoModelForImageTextToText
        fp32 = cls.from_pretrained(str(a.folder), dtype=torch.float32, attn_implementation="sdpa").to("cuda").eval()
        bf16 = cls.from_pretrained(str(a.folder), dtype=torch.bfloat16, attn_implementation="sdpa").to("cuda").eval()
        tok = transformers.AutoTokenizer.from_pretrained(str(a.folder))
        proc = transformers.AutoImageProcessor.from_pretrained(str(a.folder))
        result["load_s"] = round(time.perf_counter() - t, 1)
        cfg = fp32.config
        spec = VisionSpec(image_size=(448, 448), patch_size=cfg.vision_config.patch_size,
                          temporal_patch_size=cfg.vision_config.temporal_patch_size,
                          merge_size=cfg.vision_config.spatial_merge_size, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                          rescale_factor=1 / 255, max_images=2, image_token_id=cfg.image_token_id,
                          vision_start_token_id=cfg.vision_start_token_id, vision_end_token_id=cfg.vision_end_token_id)
        photos = gate_photos(spec)
        for prompt, which in CASES:
            images = [photos[i] for i in which]
            ids, extra = reference_inputs(prompt, images, tok, proc, fp32, spec)
            gpu_extra = {k: v.to("cuda") for k, v in extra.items()}
            tokens, ref = reference_generate(fp32, ids, a.steps, gpu_extra)
            row = {"prompt": prompt, "images": len(images), "prompt_tokens": len(ids),
                   "fp32_forward_vs_generate": metrics(ref, forced_logits(fp32, ids, tokens, extra)),
                   "bf16_vs_fp32": metrics(ref, forced_logits(bf16, ids, tokens, extra))}
            result["cases"].append(row)
            path.write_text(json.dumps(result, indent=1))
    except Exception:
        result["error"] = traceback.format_exc()[-3000:]
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1)[:6000])


if __name__ == "__main__":
    main()
