"""The parity gate of a VLM generation bundle, against transformers in FP32:

- vision: the engine's image embeddings (from the runtime's own numpy preprocessing) against the
  torch vision tower's (from transformers' image processor) on real photos, all images in one
  engine batch: cosine, rel-L2 (`image_embeds`);
- generation: per (prompt, images) case, transformers' greedy generate() with pixel_values vs the
  engine loop (vision engine, embedding merge, M-RoPE, prefill/decode), free-running tokens with
  the first divergence step, and teacher-forced per-step logits — genparity's metrics;
- one text-only prompt: a VLM bundle also answers without images.

Photos: scikit-image's bundled astronaut, chelsea (a cat) and coffee, resized to the bundle's
fixed size with PIL's bicubic filter (what transformers' processor would do to them). Lowering to
fp16/bf16 calibrates on two others (rocket, camera: calibration_feeds_vlm).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from exporter.gate.parity import ParityReport, TolerancePolicy, compare_case
from exporter.gate.tokens import past_from_present, reference_generate, token_metrics
from runtimes.errors import DataError, MissingDependency
from runtimes.generate import SamplingOptions
from runtimes.vlm import IMAGE_MARKER, VisionLanguageGenerator, VisionSpec

PHOTOS = ("astronaut", "chelsea", "coffee")
# What the vision case compares (the vision engine's outputs; deepstack_embeds: Qwen3-VL only), besides the
# token gate's logits and tokens: the names a --tolerance may give.
VISION_OUTPUTS = ("image_embeds", "deepstack_embeds")
# (prompt, indices into PHOTOS): one image before the text, one after it, two images, and no image.
CASES: tuple[tuple[str, tuple[int, ...]], ...] = (
    (f"{IMAGE_MARKER}Describe this image.", (0,)),
    (f"What is in the picture? {IMAGE_MARKER}", (1,)),
    (f"Compare {IMAGE_MARKER} with {IMAGE_MARKER}.", (2, 0)),
    ("The capital of France is", ()),
)


# AutoCast's range data (fp16/bf16 lowering): other photos than the gate's, so that the gate judges on images
# the lowering never saw; the camera is grayscale (as RGB, the way PIL's convert does it).
CALIBRATION_PHOTOS = ("rocket", "camera")
CALIBRATION_PROMPTS: tuple[tuple[str, tuple[int, ...]], ...] = (
    (f"{IMAGE_MARKER}Describe this image.", (0,)),
    (f"What differs between {IMAGE_MARKER} and {IMAGE_MARKER}?", (1, 0)),
)


def gate_photos(spec: VisionSpec, names: tuple[str, ...] = PHOTOS) -> list[np.ndarray]:
    """The gate's photos (or `names` from scikit-image's bundled ones) as HxWx3 uint8 at the bundle's size."""
    try:
        import skimage.data
        from PIL import Image
    except ImportError as exc:
        raise MissingDependency(f"The VLM gate's photos come from scikit-image and PIL, found no {exc.name}. "
                                "pip install scikit-image pillow.") from None
    h, w = spec.image_size
    out = []
    for name in names:
        arr = getattr(skimage.data, name)()
        out.append(np.asarray(Image.fromarray(arr).convert("RGB").resize((w, h), Image.BICUBIC)))
    return out


def calibration_feeds_vlm(paths: dict[str, Path], spec: VisionSpec, tokenizer: Any,
                          table: np.ndarray) -> dict[str, list[dict[str, np.ndarray]]]:
    """Range data for AutoCast, per graph of a VLM, computed as the runtime computes its feeds (numpy
    preprocessing, placeholders, embedding merge, M-RoPE, deepstack) from the FP32 graphs: the vision graph on
    CALIBRATION_PHOTOS, the prefill on CALIBRATION_PROMPTS about them, the decode on the next token with the
    prefill's cache. table: the decoder's token embeddings [vocab, hidden]."""
    from runtimes._deps import require
    from runtimes.vlm import expand_prompt, prefill_feeds, preprocess_image

    ort = require("onnxruntime", extra="cpu", purpose="Calibration feeds for a VLM's graphs")

    def session(name: str) -> Any:
        return ort.InferenceSession(str(paths[name]), providers=["CPUExecutionProvider"])

    photos = gate_photos(spec, CALIBRATION_PHOTOS)[:spec.max_images]
    pixels = np.stack([preprocess_image(p, spec) for p in photos])
    if "prefill" not in paths:  # a one-graph decoder, already at its precision (recipes/vlm_genai.py)
        return {"vision": [{"pixel_values": pixels}]}
    vision = session("vision")
    names = [o.name for o in vision.get_outputs()]
    encoded = dict(zip(names, vision.run(names, {"pixel_values": pixels})))
    feeds: dict[str, list[dict[str, np.ndarray]]] = {"vision": [{"pixel_values": pixels}], "prefill": [], "decode": []}
    prefill = session("prefill")
    outs_named = [o.name for o in prefill.get_outputs()]
    for prompt, which in CALIBRATION_PROMPTS:
        if max(which) >= len(photos):
            continue
        ids = np.array([tokenizer(expand_prompt(prompt, len(which), spec))["input_ids"]], np.int64)
        pre = prefill_feeds(ids, np.ones_like(ids), table, spec, encoded["image_embeds"][list(which)],
                            encoded["deepstack_embeds"][list(which)] if spec.deepstack else None)
        outs = dict(zip(outs_named, prefill.run(outs_named, pre)))
        feeds["prefill"].append(pre)
        feeds["decode"].append({
            "inputs_embeds": np.asarray(table[outs["next_token"]], np.float32),
            "attention_mask": np.ones((1, ids.shape[1] + 1), np.int64), "position_ids": pre["position_ids"][..., -1:] + 1,
            **past_from_present(outs),
        })
    return feeds


def reference_inputs(prompt: str, images: list[np.ndarray], tokenizer: Any, processor: Any, model: Any,
                     spec: VisionSpec) -> tuple[list[int], dict[str, Any]]:
    """What transformers' Qwen2VLProcessor gives for the prompt and images (its image processor,
    its rule of N = grid_t·grid_h·grid_w / merge² placeholder tokens per image), as token ids and
    the extra generate() inputs. (AutoProcessor itself needs torchvision for its video half.)"""
    import torch

    text = prompt.replace(IMAGE_MARKER, spec.vision_start_token + spec.image_token + spec.vision_end_token)
    extra: dict[str, Any] = {}
    if images:
        px = processor(images=images, return_tensors="pt")
        merge = processor.merge_size ** 2
        parts = text.split(spec.image_token)
        text = parts[0] + "".join(spec.image_token * int(g.prod() // merge) + rest
                                  for g, rest in zip(px["image_grid_thw"], parts[1:]))
        extra = {"pixel_values": px["pixel_values"], "image_grid_thw": px["image_grid_thw"]}
    ids = list(map(int, tokenizer(text)["input_ids"]))
    extra["mm_token_type_ids"] = (torch.tensor([ids]) == int(model.config.image_token_id)).int()
    return ids, extra


def torch_image_embeds(model: Any, processor: Any, images: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The torch vision tower's outputs named as the vision engine's: image_embeds [images, tokens, hidden], and
    for Qwen3-VL deepstack_embeds [images, levels, tokens, hidden]."""
    import torch

    px = processor(images=images, return_tensors="pt")
    with torch.inference_mode():
        out = model.model.get_image_features(px["pixel_values"], px["image_grid_thw"], return_dict=True)
    result = {"image_embeds": torch.stack(list(out.pooler_output)).float().numpy()}
    levels = getattr(out, "deepstack_features", None)
    if levels:
        result["deepstack_embeds"] = torch.stack([torch.stack(list(level)) for level in levels], dim=1).float().numpy()
    return result


def vlm_gate(model: Any, tokenizer: Any, processor: Any, bundle: Any, options: Any, say: Any) -> ParityReport:
    from exporter.gate.tokens import gate_tokens

    policy = TolerancePolicy.for_precision(options.precision, options.tolerances)
    report = ParityReport(options.precision, policy)
    if options.skip_parity:
        report.notes.append("parity not checked: --skip-parity")
        return report.finish()
    if tokenizer is None:
        raise DataError("Expected a tokenizer in the VLM folder for the gate's prompts, found none.")
    with VisionLanguageGenerator(bundle, device=options.device, verify=False) as gen:
        spec = gen.vision
        photos = gate_photos(spec)
        say(f"Vision parity: {len(photos)} photos at {spec.image_size[0]}x{spec.image_size[1]}")
        ref = torch_image_embeds(model, processor, photos)
        got = gen.encode_images_all(photos)
        report.cases.append(compare_case(f"vision: {len(photos)} photos ({', '.join(PHOTOS)}) in one batch",
                                         {"pixel_values": np.zeros((len(photos), 1), np.float32)}, ref, got, policy))
        cases = [(p, [photos[i] for i in idx]) for p, idx in CASES if len(idx) <= spec.max_images]
        inputs = [reference_inputs(p, ims, tokenizer, processor, model, spec) for p, ims in cases]
        steps = gate_tokens([ids for ids, _ in inputs], gen.max_length, options)
        greedy = SamplingOptions(max_new_tokens=steps, stop_token_ids=[])
        tol = policy.for_output("tokens")
        refs = []
        for i, ((prompt, images), (ids, extra)) in enumerate(zip(cases, inputs)):
            say(f"Token parity: reference generate() and engine, case {i} ({len(images)} image(s))")
            ref_tokens, ref_logits = reference_generate(model, ids, steps, extra)
            free = gen.generate_ids([ids], greedy, images=[images])[0].tokens
            forced = gen.generate_ids([ids], greedy, images=[images], record_logits=True, forced=[ref_tokens])[0]
            forced_logits = np.stack(forced.logits)
            refs.append((ref_tokens, ref_logits, forced_logits))
            label = f"case[{i}] {prompt!r} ({len(images)} image(s), {len(ids)} tokens, {steps} steps)"
            case = compare_case(label, {"input_ids": np.array([ids])}, {"logits": ref_logits},
                                {"logits": forced_logits}, policy)
            metric, text = token_metrics(ref_tokens, free, ref_logits, forced_logits, tol.equal)
            case.outputs.append(metric)
            report.cases.append(case)
            report.notes.append(f"case[{i}]: {text}")
        if 1 < len(cases) <= gen.max_batch:
            padded = "right-padded" if gen.right_padded else "left-padded"
            say(f"Token parity: engine, {padded} batch of {len(cases)}")
            rows = gen.generate_ids([ids for ids, _ in inputs], greedy, images=[ims for _, ims in cases])
            # each row's tie rule takes its noise from the same prompt's teacher-forced run, as the LLM gate's
            # batch does (Qwen3-VL BF16 on the H200: a batch row diverged at a reference margin of 7e-4)
            scored = [token_metrics(t, row.tokens, lg, forced, tol.equal) for (t, lg, forced), row in zip(refs, rows)]
            metric, text = min(scored, key=lambda m: m[0].equal)
            report.cases.append(compare_case(f"batch of {len(cases)} ({padded}, images in {sum(1 for _, ims in cases if ims)} rows)",
                                             {"input_ids": np.zeros((len(cases), 1), np.int64)}, {}, {}, policy))
            report.cases[-1].outputs.append(metric)
            report.notes.append(f"batch: worst row {text}")
    return report.finish()

