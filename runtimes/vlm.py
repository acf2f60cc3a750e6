"""VLM generation (Qwen2-VL) from a generation bundle, without torch: image preprocessing, prompt
placeholders, image-embedding merge and M-RoPE positions in numpy, then the causal LM's
prefill/decode loop (runtimes/decoding.py).

    from runtimes.vlm import load_vlm_generator          # or runtimes.generate.load_generator
    with load_vlm_generator("engines/qwen2-vl-ort-fp32") as g:
        out = g.generate("<image>Describe the image.", SamplingOptions(max_new_tokens=32), images=[photo])

A VLM bundle is a generation bundle with a third engine, `vision` (pixel patches → image
embeddings, exporter/export/vlm.py), and the token-embedding table (`embed_tokens.npy`); its decoder
graphs take `inputs_embeds` and M-RoPE `position_ids [3, batch, sequence]`.

Images: HxWx3 uint8 RGB arrays (or HxW grayscale) of exactly the bundle's image size; the bundle
does not resize (its size was chosen so that transformers' processor does not resize either).
Prompt: each `<image>` marks where an image goes (→ <|vision_start|><|image_pad|>×N<|vision_end|>);
a prompt that already holds `<|image_pad|>` (a chat template's output) gets each one expanded to N;
a prompt with neither gets the images in front of its text.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .decoding import Generation, Generator, SamplingOptions, _TextStream
from .errors import InvalidInput, UsageError

EMBEDDINGS_FILE = "embed_tokens.npy"
IMAGE_MARKER = "<image>"


@dataclass
class VisionSpec:
    """The vision engine's fixed image size and the preprocessing of transformers'
    Qwen2VLImageProcessor for it (written to generation.json as "vision")."""

    image_size: tuple[int, int]  # (height, width) in pixels
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    image_mean: list[float]
    image_std: list[float]
    rescale_factor: float
    max_images: int
    image_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    image_token: str = "<|image_pad|>"
    vision_start_token: str = "<|vision_start|>"
    vision_end_token: str = "<|vision_end|>"
    # Qwen3-VL: vision features added to the first `deepstack` decoder layers' hidden states at the image
    # tokens (the vision engine's deepstack_embeds output, the prefill's deepstack_embeds input); 0: none.
    deepstack: int = 0
    file: str | None = None  # the vision engine, relative to the bundle
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def grid(self) -> tuple[int, int, int]:
        """(t, h, w) in patches: one temporal patch (an image is its own frame, repeated)."""
        return 1, self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def patches(self) -> int:
        return self.grid[1] * self.grid[2]

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size ** 2

    @property
    def tokens_per_image(self) -> int:
        return self.patches // self.merge_size ** 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionSpec:
        return cls(**{**d, "image_size": tuple(d["image_size"])})


def preprocess_image(image: Any, spec: VisionSpec) -> np.ndarray:
    """transformers' Qwen2VLImageProcessor for an image of the bundle's size (no resize): rescale
    (in float64, then float32, as transformers does), normalize per channel, patchify into
    [patches, 3·temporal·patch·patch] in the processor's order (2×2 merge blocks contiguous, the
    image repeated over the temporal patch)."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)  # grayscale → RGB, as PIL's convert("RGB")
    h, w = spec.image_size
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise InvalidInput(
            f"Expected an image as an HxWx3 uint8 RGB array (or HxW grayscale), found shape {arr.shape} dtype "
            f"{arr.dtype}. Convert it first, e.g. np.asarray(PIL.Image.open(path).convert('RGB'))."
        )
    if arr.shape[:2] != (h, w):
        raise InvalidInput(
            f"Expected a {h}x{w} image (height x width: the bundle's fixed image size), found "
            f"{arr.shape[0]}x{arr.shape[1]}. Resize it first, e.g. PIL's image.resize(({w}, {h}), Image.BICUBIC) "
            f"(`enginekit generate --resize` does this), or rebuild with --shapes image_height={arr.shape[0]},"
            f"image_width={arr.shape[1]} if those are multiples of {spec.patch_size * spec.merge_size}."
        )
    scaled = (arr.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    x = (scaled - np.array(spec.image_mean, np.float32)) / np.array(spec.image_std, np.float32)
    _, gh, gw = spec.grid
    m, p, t = spec.merge_size, spec.patch_size, spec.temporal_patch_size
    x = x.transpose(2, 0, 1).reshape(3, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
    return np.ascontiguousarray(x.reshape(gh * gw, spec.patch_dim), dtype=np.float32)


def expand_prompt(prompt: str, n_images: int, spec: VisionSpec) -> str:
    """The prompt text with every image's placeholder tokens (see the module docstring)."""
    pads = spec.image_token * spec.tokens_per_image
    block = spec.vision_start_token + pads + spec.vision_end_token
    if spec.image_token in prompt:
        found, how = prompt.count(spec.image_token), spec.image_token
        out = prompt.replace(spec.image_token, pads)
    elif IMAGE_MARKER in prompt:
        found, how = prompt.count(IMAGE_MARKER), IMAGE_MARKER
        out = prompt.replace(IMAGE_MARKER, block)
    else:
        return block * n_images + prompt
    if found != n_images:
        raise UsageError(
            f"Expected one {how} in the prompt per image, found {found} for {n_images} image(s). Pass as many images "
            f"as markers, or leave the markers out to put the images before the text."
        )
    return out


def chat_content(prompt: str, n_images: int) -> str | list[dict[str, str]]:
    """A user message's content for a VLM chat template: the prompt split at each IMAGE_MARKER into text
    parts with an {"type": "image"} part where the marker was, or the images first when it has none (the
    content transformers' processors hand to Qwen-VL templates, which write each image's placeholders)."""
    if n_images == 0:
        return prompt
    pieces = prompt.split(IMAGE_MARKER)
    if len(pieces) == 1:
        return [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
    parts: list[dict[str, str]] = []
    for k, text in enumerate(pieces):
        if k:
            parts.append({"type": "image"})
        if text:
            parts.append({"type": "text", "text": text})
    return parts


def rope_index(input_ids: np.ndarray, attention_mask: np.ndarray, image_token_id: int,
               grids: Sequence[tuple[int, int, int]], merge_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2-VL's M-RoPE positions (transformers' Qwen2VLModel.get_rope_index in numpy): text tokens
    count up on all three rows; an image's tokens get (t, h, w) grid positions offset by the text
    before it, and the text after it resumes at that offset + max(h, w) / merge. Padding (mask 0)
    gets 0. Returns position_ids [3, batch, seq] and each row's delta (next position - length).
    grids: the (t, h, w) patch grid of every image, in order over the batch rows."""
    b, s = input_ids.shape
    positions = np.zeros((3, b, s), np.int64)
    deltas = np.zeros(b, np.int64)
    grid_iter = iter(grids)
    for row in range(b):
        keep = attention_mask[row].astype(bool)
        kinds = (input_ids[row][keep] == image_token_id).astype(np.int64)
        parts, current = [], 0
        for kind, group in itertools.groupby(kinds.tolist()):
            n = len(list(group))
            if kind == 0:
                parts.append(np.broadcast_to(np.arange(n) + current, (3, n)))
                current += n
            else:
                t, h, w = next(grid_iter)
                lt, lh, lw = t, h // merge_size, w // merge_size
                if lt * lh * lw != n:
                    raise InvalidInput(f"Expected {lt * lh * lw} image tokens for a {h}x{w} patch grid, found a run of {n}.")
                tt, hh, ww = np.meshgrid(np.arange(lt), np.arange(lh) + current, np.arange(lw) + current, indexing="ij")
                parts.append(np.stack([tt.ravel() + current, hh.ravel(), ww.ravel()]))
                current += max(h, w) // merge_size
        pos = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), np.int64)
        positions[:, row, keep] = pos
        deltas[row] = (pos.max() + 1 if pos.size else 0) - int(keep.sum())
    return positions, deltas


def dense_deepstack(is_image: np.ndarray, spec: VisionSpec, hidden: int, n_images: int,
                    levels: np.ndarray | None) -> np.ndarray:
    """Qwen3-VL's dense prefill input [levels, batch, sequence, hidden]: each image's deepstack features
    (the vision engine's deepstack_embeds [images, levels, tokens, hidden], images in order over the rows) at its
    tokens (`is_image` [batch, sequence]), zero elsewhere (see exporter/export/vlm.py)."""
    dense = np.zeros((spec.deepstack, *is_image.shape, hidden), np.float32)
    if n_images:
        if levels is None or levels.shape[:3] != (n_images, spec.deepstack, spec.tokens_per_image):
            raise UsageError(
                f"Expected deepstack_embeds [{n_images}, {spec.deepstack}, {spec.tokens_per_image}, {hidden}] with "
                f"image_embeds for this Qwen3-VL bundle, found {None if levels is None else levels.shape}. Pass "
                "encode_images_all()'s outputs, or the images themselves."
            )
        dense[:, is_image] = np.asarray(levels, np.float32).transpose(1, 0, 2, 3).reshape(spec.deepstack, -1, hidden)
    return dense


def prefill_feeds(ids: np.ndarray, mask: np.ndarray, table: np.ndarray, spec: VisionSpec,
                  image_embeds: np.ndarray | None, deepstack_embeds: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The prefill's inputs for token ids [batch, sequence] (padded by `mask`) whose <|image_pad|> runs stand for
    `image_embeds` [images, tokens, hidden] in order over the rows: the embedding rows of `table` [vocab, hidden]
    with the images spliced in, M-RoPE positions, and for Qwen3-VL the dense deepstack levels."""
    is_image = ids == spec.image_token_id
    n_images = 0 if image_embeds is None else len(image_embeds)
    embeds = np.asarray(table[ids], np.float32)
    if n_images:
        embeds[is_image] = np.asarray(image_embeds, np.float32).reshape(-1, embeds.shape[-1])
    positions, _ = rope_index(ids, mask, spec.image_token_id, [spec.grid] * n_images, spec.merge_size)
    feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions}
    if spec.deepstack:
        feeds["deepstack_embeds"] = dense_deepstack(is_image, spec, embeds.shape[-1], n_images, deepstack_embeds)
    return feeds


class VisionLanguageGenerator(Generator):
    """A Generator whose decoder takes inputs_embeds: the vision engine, the embedding table, the
    image merge and M-RoPE positions in front of the shared prefill/decode loop."""

    def __init__(self, bundle: str | Path, **kwargs: Any):
        super().__init__(bundle, **kwargs)
        if "vision" not in self.spec:
            raise UsageError(f"Expected a VLM bundle (generation.json with 'vision') at '{bundle}', found a causal-LM "
                             "bundle. Open it with runtimes.generate.load_generator.")
        self.vision = VisionSpec.from_dict(self.spec["vision"])
        # Memory-mapped: a decode step reads one row per token, never the whole table.
        self.embeddings = np.load(self.manifest.file(self.bundle, self.spec["embeddings"]["file"], "embedding table"),
                                  mmap_mode="r", allow_pickle=False)

    def vocab_size(self) -> int | None:
        return int(self.embeddings.shape[0])  # the decoder reads embedding rows: ids index this table

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.embeddings[ids], np.float32)

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        """Image embeddings [images, tokens_per_image, hidden] from HxWx3 uint8 arrays (batched by
        the engine's `images` range)."""
        return self.encode_images_all(images)["image_embeds"]

    def encode_images_all(self, images: Sequence[Any]) -> dict[str, np.ndarray]:
        """Every output of the vision engine: image_embeds, and Qwen3-VL's deepstack_embeds [images,
        levels, tokens_per_image, hidden]."""
        pixels = np.stack([preprocess_image(im, self.vision) for im in images])
        names = ["image_embeds"] + (["deepstack_embeds"] if self.vision.deepstack else [])
        out: dict[str, list[np.ndarray]] = {n: [] for n in names}
        step = self.vision.max_images
        for i in range(0, len(pixels), step):
            feeds = {"pixel_values": pixels[i:i + step]}
            got = self._fns["vision"](feeds) if self._fns else \
                dict(zip(names, self._runners["vision"].session.run(names, feeds)))
            for n in names:
                out[n].append(got[n])
        return {n: np.concatenate(v) for n, v in out.items()}

    def generate(self, prompt: str, options: SamplingOptions | None = None,
                 on_text: Callable[[str], None] | None = None, images: Sequence[Any] = ()) -> Generation:
        """The continuation of one prompt about `images` (see the module docstring for the markers)."""
        opts = options or SamplingOptions()
        ids = self.tokenizer.encode(expand_prompt(prompt, len(images), self.vision),
                                    add_special_tokens=opts.add_special_tokens)
        stream = _TextStream(self.tokenizer, on_text) if on_text else None
        result = self.generate_ids([ids], opts, images=[list(images)],
                                   on_token=(lambda _row, tok: stream.push(tok)) if stream else None)[0]
        result.text = self.tokenizer.decode(result.tokens)
        return result

    def generate_batch(self, prompts: Sequence[str], options: SamplingOptions | None = None,
                       images: Sequence[Sequence[Any]] | None = None) -> list[Generation]:
        opts = options or SamplingOptions()
        per_row = [list(x) for x in images] if images is not None else [[] for _ in prompts]
        if len(per_row) != len(prompts):
            raise UsageError(f"Expected one list of images per prompt, found {len(per_row)} for {len(prompts)} prompts.")
        batch = [self.tokenizer.encode(expand_prompt(p, len(im), self.vision), add_special_tokens=opts.add_special_tokens)
                 for p, im in zip(prompts, per_row)]
        results = self.generate_ids(batch, opts, images=per_row)
        for r in results:
            r.text = self.tokenizer.decode(r.tokens)
        return results

    def generate_ids(self, prompts: Sequence[Sequence[int]], options: SamplingOptions | None = None, *,
                     images: Sequence[Sequence[Any]] | None = None, image_embeds: np.ndarray | None = None,
                     deepstack_embeds: np.ndarray | None = None,
                     on_token: Callable[[int, int], None] | None = None, record_logits: bool = False,
                     forced: Sequence[Sequence[int]] | None = None,
                     cancel: Callable[[int], bool] | None = None) -> list[Generation]:
        """Generator.generate_ids with images: per prompt, the images its <|image_pad|> runs stand for
        (raw arrays), or image_embeds [images, tokens, hidden] (and for Qwen3-VL deepstack_embeds [images,
        levels, tokens, hidden]) already encoded, in order over the rows."""
        opts = options or SamplingOptions()
        opts.validate()
        self._check_batch(prompts, opts)
        if images is not None and len(images) != len(prompts):
            raise UsageError(f"Expected one list of images per prompt, found {len(images)} for {len(prompts)} prompts.")
        flat = [im for row in (images or []) for im in row]
        ids, mask = self._pad(prompts)
        v = self.vision
        is_image = ids == v.image_token_id
        runs = sum(len([k for k, _ in itertools.groupby(r[m.astype(bool)].tolist()) if k == v.image_token_id])
                   for r, m in zip(ids, mask))
        if image_embeds is None and flat:
            encoded = self.encode_images_all(flat)
            image_embeds, deepstack_embeds = encoded["image_embeds"], encoded.get("deepstack_embeds")
        embeds_given = image_embeds
        n_given = 0 if embeds_given is None else len(embeds_given)
        if int(is_image.sum()) != n_given * v.tokens_per_image or runs != n_given:
            raise UsageError(
                f"Expected the prompt(s) to hold {v.tokens_per_image} {v.image_token} tokens in one run per image, "
                f"found {int(is_image.sum())} such tokens in {runs} run(s) for {n_given} image(s). Build prompts with "
                f"the {IMAGE_MARKER} marker (generate()), or pass as many images as placeholder runs."
            )
        feeds = prefill_feeds(ids, mask, self.embeddings, v, embeds_given, deepstack_embeds)
        return self._loop(prompts, feeds, opts, on_token=on_token, record_logits=record_logits, forced=forced,
                          cancel=cancel)

    def _token_inputs(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        embeds = self.embed(tokens)
        if not (self.one_graph and self.vision.deepstack):
            return {"inputs_embeds": embeds}
        # the one-graph decoder's deepstack input is there in decode steps too: zero (no image tokens)
        return {"inputs_embeds": embeds,
                "deepstack_embeds": np.zeros((self.vision.deepstack, *embeds.shape), np.float32)}


def load_vlm_generator(bundle: str | Path, *, device: str | None = None, threads: int | None = None,
                       verify: bool = True, cuda_graph: bool | None = None) -> VisionLanguageGenerator:
    """Open a VLM generation bundle (see VisionLanguageGenerator; cuda_graph: runtimes.decoding.Generator's)."""
    return VisionLanguageGenerator(bundle, device=device, threads=threads, verify=verify, cuda_graph=cuda_graph)
