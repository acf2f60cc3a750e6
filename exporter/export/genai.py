"""The decoder of a causal LM written by ONNX Runtime GenAI's model builder (`onnxruntime_genai.models.builder`),
called from Python in the build stage: one graph with GroupQueryAttention over a shared past/present buffer,
MatMulNBits for int4/int8 weight-only, and genai_config.json, which GenAI's generator reads.

The builder supports a list of architectures (GENAI_ARCHITECTURES, the text decoders of onnxruntime-genai 0.18's
builder.py that enginekit gates); others keep enginekit's own prefill/decode export (exporter/export/generation.py).
Its prints and progress bars go to a log file in the staging folder, named in any error.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtimes._deps import require
from runtimes.choices import Precision
from runtimes.errors import BuildError
from runtimes.manifest import DimRange, IOSpec, TensorSpec

# config.json "architectures"[0] values whose decoder the 0.18 builder writes (its create_model's table).
GENAI_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM",
    "Gemma2ForCausalLM", "Gemma3ForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM", "GraniteForCausalLM",
    "OlmoForCausalLM", "NemotronForCausalLM", "SmolLM3ForCausalLM", "InternLM2ForCausalLM", "Ernie4_5ForCausalLM",
})
# enginekit's precision → the builder's -p (int8/int4: weight-only MatMulNBits, activations in FP32 on the CPU
# and FP16 on CUDA, as the builder chooses).
BUILDER_PRECISION = {Precision.FP32: "fp32", Precision.FP16: "fp16", Precision.BF16: "bf16",
                     Precision.INT8: "int8", Precision.INT4: "int4"}
# The builder's dim names → the manifest's.
DIM_NAMES = {"batch_size": "batch", "sequence_length": "sequence", "total_sequence_length": "total_sequence",
             "past_sequence_length": "past_sequence"}
FOLDER = "genai"  # inside the bundle
PAGED_BLOCK = 256  # positions per KV block of a PagedAttention decoder (the builder's default)


@dataclass
class GenaiExport:
    folder: Path  # the builder's output (genai_config.json, model.onnx + .data, tokenizer files)
    io: IOSpec
    options: dict[str, Any]  # what the builder was called with (recorded in the manifest)
    ops: dict[str, int]  # op types of the graph and their counts (GroupQueryAttention, MatMulNBits, …)


def supports(architectures: list[str] | None) -> bool:
    return bool(architectures) and str(architectures[0]) in GENAI_ARCHITECTURES


class BuilderFailed(BuildError):
    """GenAI's model builder could not write this model (--generator auto then builds enginekit's own graphs).
    cause: the builder's own exception, 'KeyError: ...'."""

    def __init__(self, message: str, cause: str):
        super().__init__(message)
        self.cause = cause


def build_decoder(source: Path, out: Path, work: Path, precision: Precision, device: str,
                  dims: dict[str, DimRange], vocab: int, paged: bool = False,
                  more_options: dict[str, str] | None = None) -> GenaiExport:
    """Run the builder on an HF folder (`source`: config.json + weights + tokenizer) into `out`. paged: the
    PagedAttention decoder (CUDA, fp16/bf16) with a KV block pool sized by the dims: every one of `batch`
    max requests at `total_sequence` max, in the builder's blocks of 256 positions, fixed (not a fraction
    of whatever GPU memory is free when the model loads). genai_config.json's search.max_length is set to
    the dims' total_sequence max (tune_config). more_options: further builder extra options (a VLM's
    exclude_embeds, exporter/export/vlm_decoder.py)."""
    require("onnxruntime_genai", extra="genai", purpose="Building a causal LM with ONNX Runtime GenAI's model builder")
    from onnxruntime_genai.models import builder

    log = work / "genai-builder.log"
    cache = work / "genai-cache"
    ep = "cuda" if device == "cuda" else "cpu"
    extra: dict[str, str] = {}
    if paged:
        blocks = dims["batch"].max * -(-dims["total_sequence"].max // PAGED_BLOCK)
        extra = {"use_paged_attention": "true", "paged_block_size": str(PAGED_BLOCK),
                 "max_batch_size": str(dims["batch"].max), "num_blocks": str(blocks)}
    extra.update(more_options or {})
    options = {"precision": BUILDER_PRECISION[precision], "execution_provider": ep, "extra_options": extra}
    try:
        with open(log, "w", encoding="utf-8") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            kv = [f"{k}={v}" for k, v in extra.items()]
            parsed = builder.parse_extra_options(None, str(source), str(out), options["precision"], ep, str(cache), kv)
            builder.create_model(None, str(source), str(out), options["precision"], ep, str(cache), **parsed)
    except Exception as exc:  # the builder raises plain Exceptions (and ValueError, KeyError, …) for what it lacks
        cause = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
        raise BuilderFailed(
            f"Expected ONNX Runtime GenAI's model builder to write the {precision} decoder for --device {device}, but it "
            f"failed: {cause}. Its log is in '{log}'. Build with enginekit's own export instead: --generator enginekit.",
            cause,
        ) from None
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    tune_config(out, dims["total_sequence"].max)
    import onnx

    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    return GenaiExport(out, decoder_io(graph, dims, vocab), options, op_counts(graph))


def decoder_io(graph: Any, dims: dict[str, DimRange], vocab: int) -> IOSpec:
    """The graph's (an onnx.ModelProto) inputs and outputs with the manifest's dim names and ranges."""
    from exporter.export.onnxutil import io_from_onnx

    ins, outs, _, _ = io_from_onnx(graph)

    def rename(t: TensorSpec) -> TensorSpec:
        return TensorSpec(t.name, t.dtype, tuple(DIM_NAMES.get(d, d) if isinstance(d, str) else d for d in t.shape))

    return IOSpec([rename(t) for t in ins], [rename(t) for t in outs], dims=dict(dims),
                  values={"input_ids": {"kind": "randint", "low": 0, "high": vocab}})


def op_counts(graph: Any) -> dict[str, int]:
    """Op types of an onnx.ModelProto and their counts, most frequent first."""
    counts: dict[str, int] = {}
    for node in graph.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def tune_config(folder: Path, max_length: int) -> None:
    """genai_config.json's search.max_length at the bundle's total_sequence max (the builder writes the model's
    context length, which sizes GenAI's shared KV buffer: 32k positions for a Qwen2.5)."""
    path = folder / "genai_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["search"]["max_length"] = int(max_length)
    path.write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
