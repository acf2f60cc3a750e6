"""VLMs (Qwen2-VL) as generation bundles: a vision engine beside the language decoder's prefill and
decode engines, and the token-embedding table the runtime merges image embeddings into.

    vision:  pixel_values [images, patches, 3·2·14·14] → image_embeds [images, tokens, hidden]
             (the vision tower and its 2×2 patch merger, for one fixed image size per bundle)
    prefill: inputs_embeds [batch, sequence, hidden], attention_mask, position_ids [3, batch, sequence]
    decode:  inputs_embeds [batch, 1, hidden], position_ids [3, batch, 1], past_key_values.*
             (both → logits, next_token, present.*, as exporter/export/generation.py's causal-LM graphs)

Why a fixed image size: the vision tower attends within each image (Qwen2-VL packs images with
`cu_seqlens`); transformers' exporter lowers that packed attention by reshaping the images into a
batch (exporter_dynamo's `_reshaped_vision_attention_forward`), which needs every image to have
the same number of patches. The rotary position ids of one image's patches are then a constant of
the graph, and the number of images stays dynamic (`images` dim).

Why the embedding table ships as a .npy and not as an engine: the runtime has to splice the vision
engine's output into the prompt's embeddings on the host anyway, and a row gather from a
memory-mapped array costs microseconds per step, where an engine call would add a session run per
decode step; the decoder graphs then take inputs_embeds on both steps and hold no embedding table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from exporter.source.spec import SourceSpec
from runtimes.errors import ExportError, SourceError, UsageError
from runtimes.manifest import DimRange, IOSpec, TensorSpec
from runtimes.vlm import EMBEDDINGS_FILE, VisionSpec

VLM_MODEL_TYPES = ("qwen2_vl",)
# Refused with a reason (see vlm_model_type): their vision towers attend in windows of unequal sizes.
UNSUPPORTED_VLM = {"qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL", "qwen3_vl_moe": "Qwen3-VL-MoE"}
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
            f"Expected a Qwen2-VL folder (model_type qwen2_vl), found model_type '{kind}' ({UNSUPPORTED_VLM[kind]}) in "
            f"'{folder}'. Its vision tower attends in windows of unequal sizes, which the fixed-size vision engine of "
            "this version cannot export; only Qwen2-VL builds as a VLM bundle."
        )
    try:
        model = transformers.AutoModelForImageTextToText.from_pretrained(str(folder), dtype=torch.float32).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        processor = transformers.AutoImageProcessor.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise SourceError(
            f"Expected '{folder}' to hold a Qwen2-VL that transformers loads (config.json, weights, tokenizer.json, "
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
            f"Expected an image size the Qwen2-VL processor keeps as is (height and width multiples of {factor}, "
            f"{lo} to {hi} pixels), found {h}x{w}. Pick e.g. --shapes image_height={max(factor, round(h / factor) * factor)}"
            f",image_width={max(factor, round(w / factor) * factor)}."
        )
    rgb = getattr(processor, "do_convert_rgb", True)
    if not (processor.do_rescale and processor.do_normalize and rgb is not False):
        raise UsageError("Expected the image processor to rescale and normalize (Qwen2-VL's defaults), found "
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
    )


def vision_io(spec: VisionSpec, hidden: int, images: DimRange) -> IOSpec:
    return IOSpec(inputs=[TensorSpec("pixel_values", "float32", ("images", spec.patches, spec.patch_dim))],
                  outputs=[TensorSpec("image_embeds", "float32", ("images", spec.tokens_per_image, hidden))],
                  dims={"images": images}, values={"pixel_values": {"kind": "normal"}})


def export_vision(model: Any, spec: VisionSpec, path: Path, images: DimRange, opset: int | None = None) -> IOSpec:
    """The vision tower + merger as one graph, exported by transformers' OnnxExporter (its patch
    turns the per-image attention loop into one batched attention; see the module docstring)."""
    import torch
    from transformers.exporters import OnnxConfig, OnnxExporter
    from transformers.vision_utils import get_vision_position_ids

    from exporter.export.graph import _condense, quiet

    visual = model.model.visual
    hidden = int(model.config.text_config.hidden_size)
    grid = torch.tensor([spec.grid])

    class Tower(torch.nn.Module):
        """pixel_values [images, patches, dim] → [images, tokens, hidden]: precomputes the packed
        attention's boundaries and the rotary ids (constants of the fixed size), so the tower's
        own data-dependent helpers never run in the graph."""

        def __init__(self) -> None:
            super().__init__()
            self.visual = visual
            self.register_buffer("rotary_ids", get_vision_position_ids(grid, spec.merge_size), persistent=False)

        def forward(self, pixel_values: Any) -> Any:
            n = pixel_values.shape[0]
            cu = torch.arange(n + 1, dtype=torch.int32) * spec.patches
            out = self.visual(pixel_values.reshape(n * spec.patches, spec.patch_dim), grid_thw=grid.expand(n, 3),
                              cu_seqlens=cu, position_ids=self.rotary_ids.repeat(n, 1))
            return out.pooler_output.reshape(n, spec.tokens_per_image, hidden)

    sample = torch.randn(2, spec.patches, spec.patch_dim)
    dyn = {"pixel_values": {0: torch.export.Dim("images", min=1, max=max(images.max, 2))}}
    with quiet():
        try:
            exported = OnnxExporter().export(Tower().eval(), {"pixel_values": sample},
                                             OnnxConfig(dynamic_shapes=dyn, opset_version=opset, optimize=False))
        except Exception as exc:  # the exporter wraps torch errors in RuntimeError
            raise ExportError(
                f"Expected the Qwen2-VL vision tower to export at {spec.image_size[0]}x{spec.image_size[1]}, but "
                f"transformers' OnnxExporter failed: {_condense(exc, 500)} Report this model."
            ) from None
    io = vision_io(spec, hidden, images)
    _finalize_vision(exported.program, io, path)
    return io


def _finalize_vision(model: Any, io: IOSpec, path: Path) -> None:
    """Name the one output (the merged embeddings) `image_embeds` and the dims, save and check."""
    from exporter.export.generation import _fold, save_checked

    graph = model.graph
    if len(graph.outputs) != 1 or [v.name for v in graph.inputs] != ["pixel_values"]:
        raise ExportError(f"Expected the vision graph to take pixel_values and give one output, found inputs "
                          f"{[v.name for v in graph.inputs]} and outputs {[v.name for v in graph.outputs]}.")
    graph.outputs[0].name = "image_embeds"
    _fold(model)
    save_checked(model, io, path)


def write_embeddings(model: Any, bundle: Path) -> str:
    """The decoder's token-embedding table [vocab, hidden] in FP32 (see the module docstring)."""
    table = model.get_input_embeddings().weight.detach().float().cpu().numpy()
    np.save(bundle / EMBEDDINGS_FILE, np.ascontiguousarray(table))
    return EMBEDDINGS_FILE
