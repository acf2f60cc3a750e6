"""VLMs (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) as generation bundles: a vision engine beside the language
decoder's prefill and decode engines, and the token-embedding table the runtime merges image embeddings into.

    vision:  pixel_values [images, patches, 3·2·p·p] → image_embeds [images, tokens, hidden]
             (+ Qwen3-VL: deepstack_embeds [images, levels, tokens, hidden])
             (the vision tower and its 2×2 patch merger, for one fixed image size per bundle)
    prefill: inputs_embeds [batch, sequence, hidden], attention_mask, position_ids [3, batch, sequence]
             (+ Qwen3-VL: deepstack_embeds [levels, batch, sequence, hidden], zero off the image tokens)
    decode:  inputs_embeds [batch, 1, hidden], position_ids [3, batch, 1], past_key_values.*
             (both → logits, next_token, present.*, as exporter/export/generation.py's causal-LM graphs)

Why a fixed image size: the vision tower attends within each image (the images are packed with
`cu_seqlens`); transformers' exporter lowers that packed attention by reshaping the segments into a
batch (exporter_dynamo's `_reshaped_vision_attention_forward`), which needs every segment to have
the same length. For one image size every image has the same number of patches, and the grid-derived
inputs (the rotary position ids, Qwen2.5-VL's window order, Qwen3-VL's interpolated position-table
taps) are constants of the graph, tiled per image; the number of images stays dynamic (`images` dim).

Qwen2.5-VL attends in windows of `window_size` pixels in most layers. Its windows are equal, and so
export, when the image's merged grid is a whole number of windows on both sides: height and width
multiples of window_size (112 px for the released models). Other sizes leave partial windows at the
right and bottom edges; they are refused with the nearest sizes that work.

Qwen3-VL's deepstack: some vision layers' features (after their own mergers) are added to the hidden
states of the first decoder layers at the image tokens. The vision engine returns them per image; the
runtime scatters them into a dense [levels, batch, sequence, hidden] tensor (zero at text tokens) and the
prefill graph adds level i after decoder layer i (a dense add equals transformers' masked add there).

Why the embedding table ships as a .npy and not as an engine: the runtime has to splice the vision
engine's output into the prompt's embeddings on the host anyway, and a row gather from a
memory-mapped array costs microseconds per step, where an engine call would add a session run per
decode step; the decoder graphs then take inputs_embeds on both steps and hold no embedding table.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from exporter.source.spec import SourceSpec
from runtimes.errors import ExportError, SourceError, UsageError
from runtimes.manifest import DimRange, IOSpec, TensorSpec
from runtimes.vlm import EMBEDDINGS_FILE, VisionSpec

VLM_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
VLM_NAMES = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL"}
# Refused with a reason (see vlm_model_type): a mixture-of-experts decoder, not built or gated here.
UNSUPPORTED_VLM = {"qwen3_vl_moe": "Qwen3-VL-MoE"}
DEFAULT_IMAGE = 448  # pixels a side: 16×16 merged tokens per image (--shapes image_height=…,image_width=…)
DEFAULT_IMAGES = DimRange(1, 1, 4)
VISION_DIMS = ("image_height", "image_width", "images")


def vlm_model_type(spec: SourceSpec) -> str | None:
    """The model_type of an hf: folder whose config names a Qwen-family VLM (read as JSON)."""
    if spec.kind != "hf":
        return None
    cfg = Path(spec.location) / "config.json"
    if not cfg.is_file():
        return None
    try:
        kind = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None
    return kind if kind in VLM_MODEL_TYPES or kind in UNSUPPORTED_VLM else None


def load_vlm(spec: SourceSpec) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(model in FP32, tokenizer, image processor, info for the manifest)."""
    import torch
    import transformers

    kind = vlm_model_type(spec)
    folder = Path(spec.location)
    if kind in UNSUPPORTED_VLM:
        raise UsageError(
            f"Expected a Qwen2-VL, Qwen2.5-VL or Qwen3-VL folder (model_type {', '.join(VLM_MODEL_TYPES)}), found "
            f"model_type '{kind}' ({UNSUPPORTED_VLM[kind]}) in '{folder}'. Its mixture-of-experts decoder is not "
            "exported or gated by this version; build a dense Qwen3-VL instead."
        )
    try:
        model = transformers.AutoModelForImageTextToText.from_pretrained(str(folder), dtype=torch.float32).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        processor = transformers.AutoImageProcessor.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise SourceError(
            f"Expected '{folder}' to hold a {VLM_NAMES[kind]} that transformers loads (config.json, weights, tokenizer.json, "
            f"preprocessor_config.json), but loading failed: {str(exc).strip().splitlines()[0][:300]}. Check the folder."
        ) from None
    info = {"task": "image-text-to-text", "family": "vlm", "model_type": model.config.model_type,
            "class": type(model).__name__}
    return model, tokenizer, processor, info


def split_vision_shapes(shapes: dict[str, DimRange]) -> tuple[dict[str, DimRange], dict[str, DimRange]]:
    """(the decoder's --shapes, the vision ones: image_height, image_width, images)."""
    return ({k: v for k, v in shapes.items() if k not in VISION_DIMS},
            {k: v for k, v in shapes.items() if k in VISION_DIMS})


def vision_spec(model: Any, tokenizer: Any, processor: Any, shapes: dict[str, DimRange]) -> VisionSpec:
    """The bundle's fixed image size and preprocessing, checked against transformers' own resize
    rule: an image of that size must pass the processor unresized, or the runtime's preprocessing
    (which does not resize) would not be the processor's."""
    import sys

    # The processor's own module defines it (the PIL and the torchvision processors each have one).
    smart_resize = sys.modules[type(processor).__module__].smart_resize
    cfg, vis = model.config, model.config.vision_config
    name = VLM_NAMES.get(cfg.model_type, cfg.model_type)
    h, w = (int(shapes[k].opt) if k in shapes else DEFAULT_IMAGE for k in ("image_height", "image_width"))
    if any(k in shapes and shapes[k].min != shapes[k].max for k in ("image_height", "image_width")):
        raise UsageError("Expected --shapes image_height=N,image_width=N as fixed sizes (a VLM bundle takes one image "
                         f"size), found ranges {({k: str(v) for k, v in shapes.items() if k != 'images'})}.")
    patch, merge, temporal = int(vis.patch_size), int(vis.spatial_merge_size), int(vis.temporal_patch_size)
    factor = patch * merge
    size = processor.size if isinstance(processor.size, dict) else dict(processor.size)
    lo, hi = size.get("shortest_edge") or 56 * 56, size.get("longest_edge") or 28 * 28 * 1280
    if h % factor or w % factor or smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi) != (h, w):
        raise UsageError(
            f"Expected an image size the {name} processor keeps as is (height and width multiples of {factor}, "
            f"{lo} to {hi} pixels), found {h}x{w}. Pick e.g. --shapes image_height={max(factor, round(h / factor) * factor)}"
            f",image_width={max(factor, round(w / factor) * factor)}."
        )
    _check_windows(vis, h, w, name)
    rgb = getattr(processor, "do_convert_rgb", True)
    if not (processor.do_rescale and processor.do_normalize and rgb is not False):
        raise UsageError(f"Expected the image processor to rescale and normalize ({name}'s defaults), found "
                         f"do_rescale={processor.do_rescale}, do_normalize={processor.do_normalize}. "
                         "Restore preprocessor_config.json's defaults.")
    images = shapes.get("images") or DEFAULT_IMAGES
    return VisionSpec(
        image_size=(h, w), patch_size=patch, temporal_patch_size=temporal, merge_size=merge,
        image_mean=[float(x) for x in processor.image_mean], image_std=[float(x) for x in processor.image_std],
        rescale_factor=float(processor.rescale_factor), max_images=images.max,
        image_token_id=int(cfg.image_token_id), vision_start_token_id=int(cfg.vision_start_token_id),
        vision_end_token_id=int(cfg.vision_end_token_id),
        image_token=tokenizer.convert_ids_to_tokens(int(cfg.image_token_id)),
        vision_start_token=tokenizer.convert_ids_to_tokens(int(cfg.vision_start_token_id)),
        vision_end_token=tokenizer.convert_ids_to_tokens(int(cfg.vision_end_token_id)),
        deepstack=len(getattr(vis, "deepstack_visual_indexes", None) or ()),
    )


def _check_windows(vis: Any, h: int, w: int, name: str) -> None:
    """Qwen2.5-VL's windowed attention exports only with equal windows (see the module docstring)."""
    window = getattr(vis, "window_size", None)
    if not window:
        return
    patch, merge = int(vis.patch_size), int(vis.spatial_merge_size)
    side = max(1, int(window) // merge // patch) * merge * patch  # pixels a window spans
    if h % side or w % side:
        def near(x: int) -> str:
            return " or ".join(str(v) for v in sorted({max(side, x // side * side), -(-x // side) * side}))

        raise UsageError(
            f"Expected an image size whose {name} attention windows are all equal (height and width multiples of "
            f"{side} px, the window of this vision tower), found {h}x{w}: its right and bottom windows would be "
            f"partial, which the fixed-size vision engine cannot export. Pick --shapes image_height={near(h)},"
            f"image_width={near(w)}."
        )


def vision_io(spec: VisionSpec, hidden: int, images: DimRange) -> IOSpec:
    outputs = [TensorSpec("image_embeds", "float32", ("images", spec.tokens_per_image, hidden))]
    if spec.deepstack:
        outputs.append(TensorSpec("deepstack_embeds", "float32", ("images", spec.deepstack, spec.tokens_per_image, hidden)))
    return IOSpec(inputs=[TensorSpec("pixel_values", "float32", ("images", spec.patches, spec.patch_dim))],
                  outputs=outputs, dims={"images": images}, values={"pixel_values": {"kind": "normal"}})


def grid_constants(visual: Any, grid: Any, merge: int) -> dict[str, Any]:
    """The tower's grid-derived inputs for one image (transformers' own vision_utils helpers, whose
    results the tower's forward takes precomputed): rotary position ids, Qwen2.5-VL's window order and
    window length, Qwen3-VL's position-table interpolation taps."""
    from transformers import vision_utils as vu

    out: dict[str, Any] = {"position_ids": vu.get_vision_position_ids(grid, merge)}
    if getattr(visual, "window_size", None):
        order, cu = vu.get_vision_window_index(grid, spatial_merge_size=merge, window_size=visual.window_size,
                                               patch_size=visual.patch_size)
        lengths = (cu[1:] - cu[:-1]).tolist()
        if len(set(lengths)) != 1:  # vision_spec's _check_windows refuses such sizes first
            raise ExportError(f"Expected equal attention windows for the fixed image size, found lengths {lengths}.")
        out.update(window_index=order, windows=len(lengths), window_length=int(lengths[0]))
    if getattr(visual, "num_grid_per_side", None):
        taps, weights = vu.get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=merge)
        out.update(interp_indices=taps, interp_weights=weights)
    return out


def export_vision(model: Any, spec: VisionSpec, path: Path, images: DimRange, opset: int | None = None) -> IOSpec:
    """The vision tower + merger (+ Qwen3-VL's deepstack mergers) as one graph, exported by transformers'
    OnnxExporter (its patch turns the per-image attention loop into one batched attention; see the module
    docstring)."""
    import torch
    from transformers.exporters import OnnxConfig, OnnxExporter

    from exporter.export.graph import _condense, quiet

    visual = model.model.visual
    hidden = int(model.config.text_config.hidden_size)
    grid = torch.tensor([spec.grid])
    const = grid_constants(visual, grid, spec.merge_size)
    tokens = spec.tokens_per_image

    class Tower(torch.nn.Module):
        """pixel_values [images, patches, dim] → [images, tokens, hidden] (+ deepstack): the grid's
        constants are tiled per image, so the tower's own data-dependent helpers never run in the graph."""

        def __init__(self) -> None:
            super().__init__()
            self.visual = visual
            for key in ("position_ids", "window_index", "interp_indices", "interp_weights"):
                if key in const:
                    self.register_buffer(key, const[key], persistent=False)

        def forward(self, pixel_values: Any) -> Any:
            n = pixel_values.shape[0]
            kw: dict[str, Any] = {"cu_seqlens": torch.arange(n + 1, dtype=torch.int32) * spec.patches,
                                  "position_ids": self.position_ids.repeat(n, 1)}
            if "window_index" in const:  # window order over merged tokens, offset per image
                kw["window_index"] = (torch.arange(n)[:, None] * tokens + self.window_index[None, :]).reshape(-1)
                kw["cu_window_seqlens"] = torch.arange(n * const["windows"] + 1, dtype=torch.int32) * const["window_length"]
            if "interp_indices" in const:
                kw["interp_indices"] = self.interp_indices.repeat(n, 1)
                kw["interp_weights"] = self.interp_weights.repeat(n, 1)
            out = self.visual(pixel_values.reshape(n * spec.patches, spec.patch_dim), grid_thw=grid.expand(n, 3), **kw)
            merged = out.pooler_output.reshape(n, tokens, hidden)
            if not spec.deepstack:
                return merged
            return merged, torch.stack([d.reshape(n, tokens, hidden) for d in out.deepstack_features], dim=1)

    sample = torch.randn(2, spec.patches, spec.patch_dim)
    dyn = {"pixel_values": {0: torch.export.Dim("images", min=1, max=max(images.max, 2))}}
    name = VLM_NAMES.get(model.config.model_type, model.config.model_type)
    with quiet(), _zero_bias(visual.patch_embed.proj):
        try:
            exported = OnnxExporter().export(Tower().eval(), {"pixel_values": sample},
                                             OnnxConfig(dynamic_shapes=dyn, opset_version=opset, optimize=False))
        except Exception as exc:  # the exporter wraps torch errors in RuntimeError
            raise ExportError(
                f"Expected the {name} vision tower to export at {spec.image_size[0]}x{spec.image_size[1]}, but "
                f"transformers' OnnxExporter failed: {_condense(exc, 500)} Report this model."
            ) from None
    io = vision_io(spec, hidden, images)
    _finalize_vision(exported.program, io, path)
    return io


@contextlib.contextmanager
def _zero_bias(conv: Any) -> Iterator[None]:
    """A bias-free Conv3d patch embedding (Qwen2.5-VL's, Qwen3-VL's has one) given a zero bias for the export:
    torch 2.13's ONNX exporter wrote its missing bias as a [32, 2] zero tensor there, which ONNX Runtime refuses
    ("bias must be a 1D tensor of size output_channels"); a zero bias computes the same."""
    import torch

    if conv.bias is not None:
        yield
        return
    conv.bias = torch.nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype))
    try:
        yield
    finally:
        conv.bias = None


def _finalize_vision(model: Any, io: IOSpec, path: Path) -> None:
    """Name the outputs (the merged embeddings `image_embeds`, Qwen3-VL's `deepstack_embeds`) and the dims, save
    and check."""
    from exporter.export.generation import _fold, save_checked

    graph = model.graph
    names = [t.name for t in io.outputs]
    if len(graph.outputs) != len(names) or [v.name for v in graph.inputs] != ["pixel_values"]:
        raise ExportError(f"Expected the vision graph to take pixel_values and give {names}, found inputs "
                          f"{[v.name for v in graph.inputs]} and outputs {[v.name for v in graph.outputs]}.")
    for value, name in zip(graph.outputs, names):
        value.name = name
    _fold(model)
    save_checked(model, io, path)


def write_embeddings(model: Any, bundle: Path) -> str:
    """The decoder's token-embedding table [vocab, hidden] in FP32 (see the module docstring)."""
    table = model.get_input_embeddings().weight.detach().float().cpu().numpy()
    np.save(bundle / EMBEDDINGS_FILE, np.ascontiguousarray(table))
    return EMBEDDINGS_FILE
