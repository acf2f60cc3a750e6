"""Zero-shot image classification on the thin runtime: a CLIP bundle's two towers and the scores.

A CLIP bundle (`enginekit build hf:./clip`) holds each tower as a complete bundle of its own, and a
manifest of its own (target backend 'zero-shot') that names them and carries `logit_scale`:

    engines/clip-ort-fp16/
      manifest.json        io = the whole model's (input_ids, attention_mask, pixel_values →
                           logits_per_image, logits_per_text, text_embeds, image_embeds), the parts,
                           logit_scale, the zero-shot gate's summary, the sha256 of each part's manifest
      parity.json, report.html   the zero-shot gate: rankings of prompts, logit matrix, embeddings
      image/  manifest.json model.onnx parity.json …   pixel_values → image_embeds
      text/   manifest.json model.onnx parity.json …   input_ids, attention_mask → text_embeds

`runtimes.load(bundle)` returns a ZeroShotRunner: `infer` takes the whole model's inputs and returns
what transformers' CLIPModel returns (normalized embeddings, logits = logit_scale × cosine), so the
bundle is a drop-in for the single-graph form. The usual service pattern is to embed the prompts
once and each image as it comes:

    with runtimes.load("engines/clip-ort-fp16") as clip:
        prompts = clip.encode_texts(input_ids, attention_mask)        # [P, D], unit norm
        probs = clip.classify(pixel_values, prompts)                  # [N, P], softmax over prompts

Each tower is also a bundle by itself (`runtimes.load(bundle / "image")`, `enginekit serve
bundle/image bundle/text` serves the towers with dynamic batching).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np

from .base import Runner
from .engines import load_engine
from .errors import IncompatibleEngine, InvalidInput
from .manifest import ZERO_SHOT_BACKEND, Manifest

BACKEND = ZERO_SHOT_BACKEND
ROLES = {"image": "image_embeds", "text": "text_embeds"}


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (CLIP compares directions)."""
    x = np.asarray(x, np.float32)
    return cast(np.ndarray, x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12))


def zero_shot_logits(image_embeds: np.ndarray, text_embeds: np.ndarray, logit_scale: float) -> np.ndarray:
    """logits_per_image [images, prompts] = logit_scale × cosine(image, prompt)."""
    return cast(np.ndarray, (logit_scale * normalize(image_embeds) @ normalize(text_embeds).T).astype(np.float32))


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return cast(np.ndarray, e / e.sum(axis=-1, keepdims=True))


class ZeroShotRunner(Runner):
    """Both towers of a zero-shot bundle; options (device, threads, cuda_graph, …) go to each tower."""

    def __init__(self, bundle: Path, manifest: Manifest, **options: Any):
        super().__init__(bundle, manifest)
        parts = manifest.target.options.get("parts", {})
        if set(parts) != set(ROLES):
            raise IncompatibleEngine(
                f"Expected a zero-shot bundle with parts {sorted(ROLES)}, found {sorted(parts)} in {bundle}. "
                f"Rebuild it: {manifest.rebuild_command}"
            )
        self.logit_scale = float(manifest.target.options["logit_scale"])
        self.image = load_engine(self.bundle / parts["image"], **options)
        try:
            self.text = load_engine(self.bundle / parts["text"], **options)
        except Exception:
            self.image.close()
            raise

    # -- the towers ------------------------------------------------------------------------------
    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """Unit-norm image embeddings [N, D]."""
        return normalize(self.image.infer({"pixel_values": pixel_values})["image_embeds"])

    def encode_texts(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Unit-norm text embeddings [P, D]."""
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        names = {s.name for s in self.text.input_specs()}
        return normalize(self.text.infer({k: v for k, v in feeds.items() if k in names})["text_embeds"])

    def classify(self, pixel_values: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
        """Zero-shot probabilities [N, P] of each image over the prompts whose embeddings are given."""
        return softmax(zero_shot_logits(self.encode_images(pixel_values), text_embeds, self.logit_scale))

    # -- the Runner shape: the whole model's inputs and outputs ------------------------------------
    def _split(self, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        img = {s.name: feeds[s.name] for s in self.image.input_specs()}
        txt = {s.name: feeds[s.name] for s in self.text.input_specs()}
        return img, txt

    def _combine(self, image_embeds: np.ndarray, text_embeds: np.ndarray) -> dict[str, np.ndarray]:
        img, txt = normalize(image_embeds), normalize(text_embeds)
        logits = zero_shot_logits(img, txt, self.logit_scale)
        out = {"logits_per_image": logits, "logits_per_text": np.ascontiguousarray(logits.T),
               "text_embeds": txt, "image_embeds": img}
        return {s.name: out[s.name] for s in self.output_specs()}

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        img, txt = self._split(feeds)
        try:
            return self._combine(self.image.infer(img)["image_embeds"], self.text.infer(txt)["text_embeds"])
        except InvalidInput as exc:
            raise InvalidInput(f"In zero-shot bundle '{self.manifest.name}': {exc}") from None

    # -- device-resident runs (enginekit bench): both towers, then the scores on the host ----------
    def prepare(self, feeds: Mapping[str, Any]) -> tuple[Any, Any]:
        img, txt = self._split(self.validate(feeds))
        return self.image.prepare(img), self.text.prepare(txt)

    def run_prepared(self, slots: tuple[Any, Any]) -> None:
        """Both towers on their prepared inputs (the scores are a host matrix product: see infer)."""
        self.image.run_prepared(slots[0])
        self.text.run_prepared(slots[1])

    def close(self) -> None:
        self.image.close()
        self.text.close()
