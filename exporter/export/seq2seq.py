"""Encoder-decoder (seq2seq) models → two ONNX graphs, the decoder's self- and cross-attention caches as
explicit inputs and outputs (T5, BART, Marian, mBART, Pegasus and other …ForConditionalGeneration text models).

    prefill: input_ids, attention_mask [batch, sequence], decoder_input_ids [batch, prefix]
             → logits [batch, 1, vocab], next_token [batch, 1],
               present.{i}.key/value [batch, heads, prefix, head_dim]   (the decoder's self-attention cache)
               cross.{i}.key/value [batch, heads, sequence, head_dim]   (every layer's cross-attention keys/values)
    decode:  decoder_input_ids [batch, 1], attention_mask [batch, sequence] (the encoder's mask),
             past_key_values.{i}.key/value [batch, heads, past_sequence, head_dim], cross.{i}.key/value
             → logits, next_token, present.{i}.key/value [batch, heads, total_sequence, head_dim]

The prefill runs the encoder once and projects its output to every layer's cross-attention keys and
values; decode steps take those as inputs and never run the encoder or the cross projections again
(what transformers' generate() does with its EncoderDecoderCache). The cross keys/values are the
decode graph's inputs only: nothing is copied back out per step.

Why a wrapper and not transformers' exporters: transformers 5.24's `decompose_for_generation` captures
an encoder-decoder's prefill and decode as calls of the whole model with `encoder_outputs` already
computed (no encoder stage) and the cache as one EncoderDecoderCache argument, so its graphs would need
a third, encoder-only export and a runtime that rebuilds the cache object; the wrapper below is the
same two calls of the model (`model(encoder_outputs=…, past_key_values=EncoderDecoderCache(…))`) with
flat tensors, exported with torch.export and torch.onnx (dynamo), as the causal LM's fallback is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.export.generation import CacheLayout, GenerationExport, GraphExport, _fold, save_checked
from exporter.export.graph import _condense, quiet
from runtimes.errors import ExportError
from runtimes.manifest import DimRange, IOSpec, TensorSpec

COMPONENTS = ("prefill", "decode")
# Sample sizes for tracing: distinct from each other and from 0/1 (torch.export specializes those).
_TRACE_BATCH, _TRACE_SOURCE, _TRACE_PREFIX, _TRACE_PAST = 2, 7, 3, 5


@dataclass
class Seq2SeqLayout(CacheLayout):
    """The decoder's caches: per layer a self-attention key/value and a cross-attention key/value."""

    def cross_names(self) -> list[str]:
        return self.names("cross")


def seq2seq_layout(model: Any) -> Seq2SeqLayout:
    """Layers, heads and head size of the decoder's caches, read off one eager prefill (T5's d_kv, BART's
    d_model / heads and Marian's differ in where the config keeps them)."""
    import torch

    step = _Prefill(model)
    ids = torch.randint(3, 16, (1, _TRACE_SOURCE))
    with torch.inference_mode():
        out = step(ids, torch.ones_like(ids), _start_ids(model, 1, 1))
    first = out[1]
    return Seq2SeqLayout(layers=(len(out) - 1) // 4, kv_heads=int(first.shape[1]), head_dim=int(first.shape[3]),
                         dtype=str(first.dtype).removeprefix("torch."))


def component_io(name: str, cache: Seq2SeqLayout, vocab: int, dims: dict[str, DimRange]) -> IOSpec:
    """The canonical IOSpec of one component (see the module docstring)."""
    prefill = name == "prefill"
    kv = (cache.dtype, ("batch", cache.kv_heads))
    if prefill:
        inputs = [TensorSpec("input_ids", "int64", ("batch", "sequence")),
                  TensorSpec("attention_mask", "int64", ("batch", "sequence")),
                  TensorSpec("decoder_input_ids", "int64", ("batch", "prefix"))]
    else:
        inputs = [TensorSpec("decoder_input_ids", "int64", ("batch", 1)),
                  TensorSpec("attention_mask", "int64", ("batch", "sequence"))]
        inputs += [TensorSpec(n, kv[0], (*kv[1], "past_sequence", cache.head_dim)) for n in cache.names("past_key_values")]
        inputs += [TensorSpec(n, kv[0], (*kv[1], "sequence", cache.head_dim)) for n in cache.cross_names()]
    outputs = [TensorSpec("logits", "float32", ("batch", 1, vocab)), TensorSpec("next_token", "int64", ("batch", 1))]
    length = "prefix" if prefill else "total_sequence"
    outputs += [TensorSpec(n, kv[0], (*kv[1], length, cache.head_dim)) for n in cache.names("present")]
    if prefill:
        outputs += [TensorSpec(n, kv[0], (*kv[1], "sequence", cache.head_dim)) for n in cache.cross_names()]
    used = {d for s in inputs + outputs for d in s.shape if isinstance(d, str)}
    values = {"input_ids": {"kind": "randint", "low": 0, "high": vocab}, "attention_mask": {"kind": "ones"},
              "decoder_input_ids": {"kind": "randint", "low": 0, "high": vocab}}
    return IOSpec(inputs=inputs, outputs=outputs, dims={k: v for k, v in dims.items() if k in used},
                  values={k: v for k, v in values.items() if k in {s.name for s in inputs}})


def export_seq2seq(model: Any, work: Path, dims: dict[str, DimRange], *, opset: int | None = None) -> GenerationExport:
    """Export `model` (a transformers encoder-decoder LM, FP32 or the dtype of a native export) to
    work/prefill.onnx and work/decode.onnx."""
    cache = seq2seq_layout(model)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    graphs = _export_graphs(model, cache, opset)
    out: dict[str, GraphExport] = {}
    opset_used = 0
    for name in COMPONENTS:
        io = component_io(name, cache, vocab, dims)
        path = Path(work) / f"{name}.onnx"
        opset_used = _finalize(graphs[name], io, path)
        out[name] = GraphExport(path, io)
    return GenerationExport(out, cache, "torch.onnx.export (dynamo) of an encoder-decoder cache wrapper", opset_used,
                            ["seq2seq: the prefill runs the encoder and every layer's cross-attention projections once"])


def _start_ids(model: Any, batch: int, length: int) -> Any:
    import torch

    start = model.generation_config.decoder_start_token_id
    start = model.config.decoder_start_token_id if start is None else start
    return torch.full((batch, length), int(start or 0), dtype=torch.int64)


def _flat(cache: Any) -> list[Any]:
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


class _Prefill:
    """The encoder, then the decoder on the prefix: logits of the last position, the self-attention cache and
    the cross-attention keys/values (a torch.nn.Module made on first use: torch is imported lazily)."""

    def __new__(cls, model: Any) -> Any:
        import torch
        from transformers import DynamicCache, EncoderDecoderCache

        class Prefill(torch.nn.Module):
            def __init__(self, lm: Any):
                super().__init__()
                self.lm = lm

            def forward(self, input_ids: Any, attention_mask: Any, decoder_input_ids: Any) -> tuple[Any, ...]:
                encoded = self.lm.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
                kv = EncoderDecoderCache(DynamicCache(), DynamicCache())
                out = self.lm(encoder_outputs=encoded, attention_mask=attention_mask,
                              decoder_input_ids=decoder_input_ids, past_key_values=kv, use_cache=True, return_dict=True)
                return (out.logits[:, -1:], *_flat(kv.self_attention_cache), *_flat(kv.cross_attention_cache))

        return Prefill(model)


class _Decode:
    """One decoder step from the self-attention cache and the cross-attention keys/values."""

    def __new__(cls, model: Any) -> Any:
        import torch
        from transformers import DynamicCache, EncoderDecoderCache
        from transformers.modeling_outputs import BaseModelOutput

        class Decode(torch.nn.Module):
            def __init__(self, lm: Any):
                super().__init__()
                self.lm = lm

            def forward(self, decoder_input_ids: Any, attention_mask: Any, *caches: Any) -> tuple[Any, ...]:
                half = len(caches) // 2
                own, cross = DynamicCache(), DynamicCache()
                for i in range(half // 2):
                    own.update(caches[2 * i], caches[2 * i + 1], i)
                    cross.update(caches[half + 2 * i], caches[half + 2 * i + 1], i)
                kv = EncoderDecoderCache(own, cross)  # cross layers filled: their projections are not run again
                # The encoder's output is not read once the cross cache is filled; the model still wants an
                # encoder_outputs object (and its batch/length) to skip the encoder: a zero-width stand-in.
                hidden = attention_mask[:, :, None].to(caches[0].dtype)
                out = self.lm(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=attention_mask,
                              decoder_input_ids=decoder_input_ids, past_key_values=kv, use_cache=True, return_dict=True)
                return (out.logits, *_flat(kv.self_attention_cache))

        return Decode(model)


def _export_graphs(model: Any, cache: Seq2SeqLayout, opset: int | None) -> dict[str, Any]:
    import torch

    dtype = next(model.parameters()).dtype
    b, s, q, p = _TRACE_BATCH, _TRACE_SOURCE, _TRACE_PREFIX, _TRACE_PAST
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("sequence", min=1, max=1 << 16)
    prefix = torch.export.Dim("prefix", min=1, max=1 << 12)
    past_dim = torch.export.Dim("past_sequence", min=1, max=1 << 12)
    ids = torch.randint(3, 16, (b, s))
    mask = torch.ones(b, s, dtype=torch.int64)
    plans = {
        "prefill": (_Prefill(model), (ids, mask, _start_ids(model, b, q)),
                    ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: prefix}),
                    ["input_ids", "attention_mask", "decoder_input_ids"],
                    ["logits", *cache.names("present"), *cache.cross_names()]),
        "decode": (_Decode(model), (_start_ids(model, b, 1), mask,
                                    *[torch.randn(b, cache.kv_heads, p, cache.head_dim, dtype=dtype) for _ in range(2 * cache.layers)],
                                    *[torch.randn(b, cache.kv_heads, s, cache.head_dim, dtype=dtype) for _ in range(2 * cache.layers)]),
                   ({0: batch}, {0: batch, 1: seq},
                    tuple([{0: batch, 2: past_dim}] * (2 * cache.layers) + [{0: batch, 2: seq}] * (2 * cache.layers))),
                   ["decoder_input_ids", "attention_mask", *cache.names("past_key_values"), *cache.cross_names()],
                   ["logits", *cache.names("present")]),
    }
    patches, fixes, table = _transformers_patches()
    graphs = {}
    for name, (module, args, shapes, in_names, out_names) in plans.items():
        with quiet(), patches():
            try:
                ep = torch.export.export(module.eval(), args, dynamic_shapes=shapes, strict=False,
                                         prefer_deferred_runtime_asserts_over_guards=True)
                fixes(ep.graph_module)
                graphs[name] = torch.onnx.export(ep, args, dynamo=True, opset_version=opset, input_names=in_names,
                                                 output_names=out_names, optimize=False, verbose=False,
                                                 custom_translation_table=table).model
            except Exception as exc:  # torch.export / torch.onnx raise many types
                raise ExportError(
                    f"Expected the encoder-decoder model to export as its {name} graph with its self- and "
                    f"cross-attention caches as inputs and outputs, but it failed: {_condense(exc, 600)} Report "
                    "this model."
                ) from None
    return graphs


def _transformers_patches() -> tuple[Any, Any, Any]:
    """transformers' own ONNX export fixes (what its OnnxExporter applies around torch.onnx): op patches,
    FX node fixes and translations. Without them T5's attention fails in torch.onnx's decompositions
    ("Cannot view a tensor with shape [batch, sequence, heads, d_kv] … as (batch, sequence, inner)")."""
    import contextlib

    try:
        from transformers.exporters.exporter_onnx import _ONNX_TRANSLATION_TABLE
        from transformers.exporters.utils import apply_fx_node_fixes, apply_patches
    except ImportError:  # a transformers without its exporters: plain torch.onnx
        return contextlib.nullcontext, lambda _gm: None, None
    return (lambda: apply_patches("onnx")), (lambda gm: apply_fx_node_fixes("onnx", gm)), _ONNX_TRANSLATION_TABLE


def _finalize(model: Any, io: IOSpec, path: Path) -> int:
    """Check the names, add `next_token` (ArgMax of the logits), put the inputs in canonical order, save."""
    import onnx_ir as ir

    _fold(model)
    graph = model.graph
    want_in = [s.name for s in io.inputs]
    want_out = [s.name for s in io.outputs if s.name != "next_token"]
    got_in, got_out = [v.name for v in graph.inputs], [v.name for v in graph.outputs]
    if sorted(got_in) != sorted(want_in) or got_out != want_out:
        raise ExportError(f"Expected the {path.stem} graph's inputs {want_in} and outputs {want_out}, found {got_in} "
                          f"and {got_out}. Report this model.")
    logits = graph.outputs[0]
    argmax = ir.node("ArgMax", [logits], attributes={"axis": -1, "keepdims": 0}, name="enginekit_next_token")
    argmax.outputs[0].name = "next_token"
    argmax.outputs[0].dtype = ir.DataType.INT64
    graph.append(argmax)
    graph.outputs.insert(1, argmax.outputs[0])
    order = {n: i for i, n in enumerate(want_in)}
    inputs = sorted(graph.inputs, key=lambda v: order[v.name])
    graph.inputs.clear()
    graph.inputs.extend(inputs)
    return save_checked(model, io, path)
