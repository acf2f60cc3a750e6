"""`enginekit build` for Qwen2.5-VL / Qwen3-VL with the decoder as ONE graph: ONNX Runtime GenAI's model builder
writes the text decoder on inputs_embeds (exporter/export/vlm_decoder.py rewrites its edges: deepstack, FP32
inputs, last-position logits), enginekit exports and lowers the vision engine as for every VLM, and the bundle runs
on enginekit's own loop (runtimes/vlm.py: preprocessing, image merge, M-RoPE, then prefill and decode steps in the
one decoder session, so its weights are held once).

    source ─▶ vision.onnx (lowered: fp16/bf16 AutoCast)  ─┐
          ─▶ the builder's decoder (fp32 | bf16 | fp16 | int8/int4 weight-only) + rewrite ─┴▶ engines ─▶ VLM gate ─▶ bundle

Where it applies (use_vlm_decoder): --generator auto or genai, a model_type the builder writes (qwen2_5_vl,
qwen3_vl), and a precision its decoder runs at on that device: fp32, int8, int4 on the CPU; bf16, fp16, int8, int4
on CUDA. The builder's FP16 CPU decoder and FP32 CUDA decoder fail to run in onnxruntime 1.31/1.32 (measured for
causal LMs, exporter/recipes/genai.py), so fp16 on the CPU and fp32 on CUDA keep enginekit's two graphs, as does
Qwen2-VL (not in the builder). int8/int4 are weight-only MatMulNBits in the decoder; their vision engine is FP32 on
the CPU and FP16 on CUDA.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from exporter.export.generation import GenerationExport, GraphExport, cache_layout
from exporter.export.vlm_decoder import BUILDER_VLMS, build_vlm_decoder
from exporter.timing import timed
from runtimes._deps import version_of
from runtimes.choices import Precision
from runtimes.errors import UsageError
from runtimes.manifest import DimRange

DECODER = "decoder"  # the one-graph component's name in generation.json (and its folder in the bundle)
CPU_PRECISIONS = (Precision.FP32, Precision.INT8, Precision.INT4)
GPU_PRECISIONS = (Precision.BF16, Precision.FP16, Precision.INT8, Precision.INT4)


def use_vlm_decoder(options: Any, model_type: str) -> bool:
    """Whether this VLM's decoder is the builder's one graph (module docstring); what cannot be built either way is
    refused with the way out."""
    weight_only = options.precision in (Precision.INT8, Precision.INT4)
    runs = CPU_PRECISIONS if not options.device.gpu else GPU_PRECISIONS
    own = options.generator == "enginekit" or options.exporter != "auto"
    if model_type in BUILDER_VLMS and not own and options.precision in runs:
        return True
    if options.generator == "genai" or weight_only:
        why = (f"model_type '{model_type}' is not one ONNX Runtime GenAI's builder writes (qwen2_5_vl, qwen3_vl)"
               if model_type not in BUILDER_VLMS else
               f"--generator {options.generator} --exporter {options.exporter} names enginekit's own graphs" if own else
               f"the builder's {options.precision} decoder does not run on --device {options.device} (it does at "
               f"{', '.join(str(p) for p in runs)})")
        raise UsageError(
            f"Expected a VLM whose decoder ONNX Runtime GenAI's builder writes for --precision {options.precision}"
            f"{' / --generator genai' if options.generator == 'genai' else ''}, found that {why}. int8/int4 VLM "
            "decoders exist only that way: build Qwen2.5-VL or Qwen3-VL with --generator auto, or pick fp32/fp16/bf16 "
            "(enginekit's own graphs)."
        )
    return False


def export_or_none(spec: Any, options: Any, staging: Path, model: Any, tokenizer: Any, vision: Any,
                   dims: dict[str, DimRange], info: dict[str, Any], timings: dict[str, float],
                   say: Any) -> GenerationExport | None:
    """export_one_graph where use_vlm_decoder says so; None otherwise, or when the builder failed under --generator
    auto at fp32/fp16/bf16 (the staging folders emptied: enginekit's two graphs are built then)."""
    from exporter.export.genai import BuilderFailed
    from exporter.export.memory import check_memory

    if not use_vlm_decoder(options, info["model_type"]):
        return None
    try:
        exported = export_one_graph(spec, options, staging / "work", model, tokenizer, vision, dims, timings, say)
    except BuilderFailed:
        if options.generator != "auto" or options.precision in (Precision.INT8, Precision.INT4):
            raise  # --generator genai asked for it; weight-only VLM decoders exist only this way
        say("ONNX Runtime GenAI's builder failed: building enginekit's own graphs")
        for folder in (staging / "work", staging / "bundle"):
            shutil.rmtree(folder)
            folder.mkdir()
        return None
    check_memory(exported.components["vision"].io, options.memory_limit, graph=exported.components["vision"].path)
    return exported


def vision_precision(options: Any) -> Precision:
    """The vision engine's precision: the build's, except weight-only builds (FP16 on CUDA, FP32 on the CPU)."""
    if options.precision in (Precision.INT8, Precision.INT4):
        return Precision.FP16 if options.device.gpu else Precision.FP32
    return options.precision


def export_one_graph(spec: Any, options: Any, work: Path, model: Any, tokenizer: Any, vision: Any,
                     dims: dict[str, DimRange], timings: dict[str, float], say: Any) -> GenerationExport:
    """The builder's decoder (work/genai) and enginekit's vision engine (work/vision.onnx)."""
    from exporter.export.vlm import DEFAULT_IMAGES, export_vision
    from exporter.recipes.genai import _builder_source

    text = model.config.text_config
    vocab = int(model.get_output_embeddings().weight.shape[0])
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
    with timed(timings, "export", say, f"ONNX Runtime GenAI's model builder: the {options.precision} decoder for "
               f"{options.device} as one graph, and the vision engine"):
        built = build_vlm_decoder(_builder_source(spec, model, tokenizer, work), work / "genai", work, options.precision,
                                  str(options.device), dims, vocab, vision.deepstack, head_dim)
        images = options.shapes.get("images") or DEFAULT_IMAGES
        vision_io = export_vision(model, vision, work / "vision.onnx", images, opset=options.opset)
    exported = GenerationExport(
        components={DECODER: GraphExport(built.folder / "model.onnx", built.io),
                    "vision": GraphExport(work / "vision.onnx", vision_io)},
        cache=cache_layout(model.config), exporter=f"onnxruntime-genai {version_of('onnxruntime_genai')} model builder "
        "(decoder) + transformers OnnxExporter (vision)", opset=0,
        notes=[f"decoder: one graph for prefill and decode by ONNX Runtime GenAI's builder ({built.options['rewrite']})"],
        builder=built)
    return exported


def lower_one_graph(exported: GenerationExport, options: Any, work: Path, feeds: dict[str, Any] | None,
                    kept: Any, lower_all: Callable[..., Any]) -> tuple[dict[str, Path], dict[str, Any]]:
    """recipes/generation.py's lowering (`lower_all`) for the vision engine alone (at vision_precision); the decoder
    is already at the build's precision, as the builder wrote it."""
    from exporter.recipes.genai import _weights_text

    sub = replace(exported, components={"vision": exported.components["vision"]})
    lowered, realised = lower_all(sub, replace(options, precision=vision_precision(options)), work, feeds, kept)
    built = exported.builder
    lowered[DECODER] = exported.components[DECODER].path
    vision = realised.pop("vision", None) or {"requested": str(vision_precision(options))}
    return lowered, {"requested": str(options.precision), "vision": vision, **{k: v for k, v in realised.items()
                                                                              if k != "requested"},
                     DECODER: {"by": "onnxruntime-genai model builder", "precision": built.options["precision"],
                               "weights": _weights_text(options.precision, built.ops)}}


def place_decoder(exported: GenerationExport, bundle: Path) -> tuple[list[str], dict[str, Any]]:
    """The builder's graph and weights into bundle/decoder/ (hard links: the work folder keeps them for a rebuild
    after a provider refusal, and 16 GB are not copied); returns the files and the component's fusions record."""
    folder = bundle / DECODER
    folder.mkdir()
    source = exported.components[DECODER].path.parent
    files = []
    for name in ("model.onnx", "model.onnx.data"):
        if not (source / name).is_file():
            continue
        try:
            os.link(source / name, folder / name)
        except OSError:  # another file system
            shutil.copy2(source / name, folder / name)
        files.append(f"{DECODER}/{name}")
    ops = exported.builder.ops
    fused = {k: v for k, v in ops.items() if k in ("GroupQueryAttention", "MRotaryEmbedding", "MatMulNBits",
                                                    "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization")}
    return files, {"writer": "onnxruntime-genai model builder", "fused_ops": fused,
                   "builder": exported.builder.options}


def spec_fields() -> dict[str, Any]:
    """generation.json fields that tell the runtime to run the one graph for both steps, rows right-padded."""
    return {"stages": {"prefill": DECODER, "decode": DECODER}, "padding": "right"}
