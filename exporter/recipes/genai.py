"""`enginekit build` for a causal LM on ONNX Runtime GenAI: its model builder writes the decoder
(exporter/export/genai.py), enginekit's token gate proves it against transformers' generate() in FP32
(greedy tokens, teacher-forced logits, a padded batch), and the bundle records it like any other.

    source ─▶ the builder (fp32 | fp16 | bf16 | int8/int4 weight-only, cpu | cuda) ─▶ genai/ ─▶ token parity ─▶ bundle

Bundle: genai/ (genai_config.json, model.onnx + .data, the tokenizer files the builder copies), generation.json
("runtime": "onnxruntime-genai"), manifest.json (io: the decoder's), parity.json, report.html. runtimes.genai
runs it (og.Generator for batches, og.Engine for the server's continuous batching).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from exporter.export.genai import FOLDER, build_decoder, supports
from exporter.export.generation import sliding_window
from exporter.options import build_command
from exporter.source.causal import generation_metadata, gguf_file
from exporter.source.spec import SourceSpec
from exporter.timing import timed
from runtimes._deps import version_of
from runtimes._version import __version__
from runtimes.choices import Precision
from runtimes.errors import UsageError
from runtimes.genai import RUNTIME
from runtimes.generate import GENERATION_FILE, TOKENIZER_FILE
from runtimes.manifest import DimRange, Manifest, Target, file_sha256


def use_genai(options: Any, model: Any, vlm: bool, total: int | None = None) -> bool:
    """Whether this build goes through GenAI (see _decide); --genai-attention paged where it does not is refused.
    total: the bundle's longest prompt + generation (its total_sequence max)."""
    chosen = _decide(options, model, vlm, total)
    if not chosen and options.genai_attention == "paged":
        raise UsageError(f"Expected a build on ONNX Runtime GenAI for --genai-attention paged, found one on enginekit's "
                         f"own graphs ({type(model).__name__}{', a VLM' if vlm else ''}). Drop --genai-attention.")
    return chosen


def _decide(options: Any, model: Any, vlm: bool, total: int | None = None) -> bool:
    """Whether this build goes through GenAI: --generator genai, or auto for an architecture its builder writes
    (INT4 only there) unless --exporter or --lowering native ask for enginekit's own graphs; a VLM never (its
    decoder, where the builder writes one, is decided by recipes/vlm_genai.py and runs on enginekit's loop)."""
    arch = type(model).__name__
    wanted = options.generator
    if vlm:  # recipes/vlm_genai.py decides a VLM's decoder (and refuses --generator genai where it cannot be)
        return False
    if options.genai_attention == "paged" and not (options.device.gpu and options.precision.mixed):
        raise UsageError(
            f"Expected --device cuda with --precision fp16 or bf16 for --genai-attention paged, found --device "
            f"{options.device} --precision {options.precision}: ONNX Runtime GenAI's PagedAttention decoder exists for "
            "CUDA in FP16/BF16 only. Drop --genai-attention, or build for the GPU in fp16/bf16."
        )
    if wanted == "auto" and (options.exporter != "auto" or options.lowering == "native"):
        wanted = "enginekit"  # --exporter torch|transformers and --lowering native name enginekit's own graphs
    if wanted == "enginekit":
        if options.precision is Precision.INT4:
            raise UsageError("Expected --generator auto or genai with --precision int4, found --generator enginekit: int4 "
                             "weight-only decoders are written by ONNX Runtime GenAI's builder. Use --precision int8 "
                             "(enginekit's weight-only MatMulNBits) or drop --generator.")
        return False
    if options.precision is Precision.FP16 and not options.device.gpu:
        # The builder's FP16 CPU decoder fails at run time in onnxruntime 1.32 ("Shape mismatch attempting to
        # re-use buffer" in a Cast of repeat_kv, measured on a tiny Qwen2): enginekit's AutoCast FP16 runs there.
        if wanted == "genai":
            raise UsageError("Expected --device cuda with --generator genai --precision fp16, found --device cpu: the "
                             "FP16 decoder ONNX Runtime GenAI's builder writes for the CPU fails to run in onnxruntime "
                             "1.32. Drop --generator (enginekit's FP16 lowering runs on the CPU) or use fp32/int8/int4.")
        return False
    if options.precision is Precision.FP32 and options.device.gpu:
        # The builder's FP32 CUDA decoder does not load in onnxruntime-gpu 1.31.1 ("This is an invalid model",
        # Graph::InitializeStateFromModelFileGraphProto; H200, 2026-12-01): enginekit's FP32 CUDA graphs run.
        if wanted == "genai":
            raise UsageError("Expected --precision bf16, fp16 or int4 with --generator genai --device cuda, found fp32: "
                             "the FP32 CUDA decoder ONNX Runtime GenAI's builder writes does not load in onnxruntime-gpu "
                             "1.31 (\"invalid model\"). Drop --generator (enginekit's FP32 CUDA graphs run) or use bf16.")
        return False
    if not supports([arch]):
        if wanted == "genai" or options.precision is Precision.INT4:
            raise UsageError(
                f"Expected an architecture ONNX Runtime GenAI's model builder writes for --generator genai / --precision "
                f"int4, found {arch}. Build it with enginekit's own export (--generator enginekit, --precision fp32, fp16, "
                "bf16 or int8)."
            )
        return False
    window = sliding_window(model.config)
    if window and total and window < total:
        # Prompts past the window broke GenAI 0.18's CPU GroupQueryAttention on tiny Mistral and Gemma 2 (window 16:
        # "present.0.key has shape {1,2,32,16} but the computed output shape is {1,2,33,16}", "seqlens_k[0] = 11 is
        # too small for sequence_length 38"); enginekit's graphs keep the whole cache and mask to the window.
        if wanted == "genai":
            raise UsageError(
                f"Expected a sliding window of at least the bundle's {total} tokens for --generator genai, found "
                f"{arch}'s sliding_window {window}: ONNX Runtime GenAI 0.18's decoder failed on prompts past the window "
                f"(measured). Drop --generator (enginekit's graphs gate past the window) or cap total_sequence at "
                f"{window} with --shapes."
            )
        return False
    return True


def build_genai_into(spec: SourceSpec, source_text: str, options: Any, output: Path, staging: Path, say: Any,
                     timings: dict[str, float], model: Any, tokenizer: Any, info: dict[str, Any],
                     dims: dict[str, DimRange]) -> tuple[Manifest, Any]:
    from exporter.gate.tokens import parity_prompts, token_gate

    work, bundle = staging / "work", staging / "bundle"
    vocab = int(model.get_output_embeddings().weight.shape[0])
    source = _builder_source(spec, model, tokenizer, work)
    paged = options.genai_attention == "paged"
    twin = None
    with timed(timings, "export", say, f"ONNX Runtime GenAI's model builder: the {options.precision} decoder "
               f"for {options.device}" + (" (PagedAttention, and its GroupQueryAttention twin for the gate)" if paged else "")):
        exported = build_decoder(source, bundle / FOLDER, work, options.precision, str(options.device), dims, vocab,
                                 paged=paged)
        if paged:  # og.Generator cannot run a paged decoder; the gate takes its teacher-forced logits from this twin
            twin = build_decoder(source, work / "twin", work, options.precision, str(options.device), dims, vocab).folder
    tokenizer_file = f"{FOLDER}/{TOKENIZER_FILE}"
    if not (bundle / tokenizer_file).is_file():
        backend = getattr(tokenizer, "backend_tokenizer", None) if tokenizer is not None else None
        if backend is not None:
            backend.save(str(bundle / tokenizer_file))
    engine_files = [f"{FOLDER}/{n}" for n in ("model.onnx", "model.onnx.data") if (exported.folder / n).is_file()]
    generation = {
        "schema_version": 1,
        "runtime": RUNTIME,
        "genai": {"folder": FOLDER, "vocab_size": vocab, "builder": exported.options,
                  "attention": "paged" if paged else "default"},
        "components": {"decoder": {"file": engine_files[0], "io": exported.io.to_dict()}},
        "tokenizer": tokenizer_file if (bundle / tokenizer_file).is_file() else None,
        **generation_metadata(model, tokenizer),
    }
    (bundle / GENERATION_FILE).write_text(json.dumps(generation, indent=2, default=str) + "\n", encoding="utf-8")
    provider = "CUDAExecutionProvider" if options.device.gpu else "CPUExecutionProvider"
    target = Target(
        backend="ort", device=str(options.device), engine_files=engine_files, providers=[provider],
        options={"generator": RUNTIME, "generation": {"decoder": {"file": engine_files[0]}},
                 "builder": exported.options, "ops": exported.ops},
        versions={"onnxruntime": version_of("onnxruntime"), "onnxruntime-genai": version_of("onnxruntime_genai")},
    )
    realised = {"requested": str(options.precision), "by": "onnxruntime-genai model builder",
                "weights": _weights_text(options.precision, exported.ops), "ops": exported.ops}
    manifest = Manifest(
        name=output.name,
        source={"spec": str(spec), "kind": spec.kind, "exporter": f"onnxruntime-genai {version_of('onnxruntime_genai')} "
                "model builder", "onnx_sha256": file_sha256(bundle / engine_files[0]), **info},
        io=exported.io,
        precision=realised,
        target=target,
        build_command=build_command(source_text, options, output, {k: v for k, v in dims.items() if k != "past_sequence"}),
        enginekit_version=__version__,
    )
    files = sorted(str(p.relative_to(bundle)) for p in exported.folder.rglob("*") if p.is_file())
    manifest.files = {f: file_sha256(bundle / f) for f in [*files, GENERATION_FILE]}
    manifest.write(bundle)
    prompts = parity_prompts(tokenizer, options.data, model.config, dims)
    with timed(timings, "gate", say, "Token parity: GenAI vs transformers generate() (FP32)"):
        report = token_gate(model, tokenizer, bundle, prompts, options, {}, say, twin=twin)
    return manifest, report


def _builder_source(spec: SourceSpec, model: Any, tokenizer: Any, work: Path) -> Path:
    """The HF folder the builder reads: the source folder itself, or (a GGUF source) the FP32 model and its
    tokenizer saved with save_pretrained into the staging folder."""
    folder = Path(spec.location)
    if gguf_file(spec) is None and (folder / "config.json").is_file():
        return folder
    out = work / "hf"
    # A GGUF-loaded model is already dequantized to FP32; transformers refuses to save it while its GGUF
    # quantizer is attached ("not serializable"), so the quantizer is detached for the save and put back.
    quantizer, qconfig = getattr(model, "hf_quantizer", None), getattr(model.config, "quantization_config", None)
    try:
        model.hf_quantizer = None
        if qconfig is not None:
            del model.config.quantization_config
        model.save_pretrained(str(out))
    finally:
        model.hf_quantizer = quantizer
        if qconfig is not None:
            model.config.quantization_config = qconfig
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def _weights_text(precision: Precision, ops: dict[str, int]) -> str:
    if precision in (Precision.INT4, Precision.INT8):
        return f"{precision} weight-only: {ops.get('MatMulNBits', 0)} MatMulNBits (block-wise scales from the weights)"
    return f"{precision} weights and activations as the builder writes them"
