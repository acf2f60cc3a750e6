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

from exporter.export.generation import (
    CacheLayout,
    GenerationExport,
    GraphExport,
    _cache_kwarg,
    _fold,
    save_checked,
)
from exporter.export.graph import _condense, quiet
from runtimes.errors import ExportError
from runtimes.manifest import DimRange, IOSpec, TensorSpec

COMPONENTS = ("prefill", "decode")
# Sample sizes for tracing: distinct from each other and from 0/1 (torch.export specializes those).
_TRACE_BATCH, _TRACE_SOURCE, _TRACE_PREFIX, _TRACE_PAST = 2, 7, 3, 5


@dataclass
class Seq2SeqLayout(CacheLayout):
    """The decoder's caches: per layer a self-attention key/value and a cross-attention key/value. audio: the
    encoder takes log-mel features [batch, mels, frames] of a fixed length (Whisper: 30 s, 3000 frames) and its
    output has `encoder_length` positions; text encoders take token ids of any length."""

    mels: int = 0
    frames: int = 0
    encoder_length: int = 0
    image: tuple[int, int, int] | None = None  # a captioning model's pixel_values [3, height, width] (BLIP)

    @property
    def audio(self) -> bool:
        return self.frames > 0

    @property
    def fixed_source(self) -> bool:
        """The encoder takes a fixed-size input (features or pixels): no mask, cross keys/values of fixed length."""
        return self.audio or self.image is not None

    @property
    def source(self) -> TensorSpec:
        if self.audio:
            return TensorSpec("input_features", "float32", ("batch", self.mels, self.frames))
        if self.image is not None:
            return TensorSpec("pixel_values", "float32", ("batch", *self.image))
        return TensorSpec("input_ids", "int64", ("batch", "sequence"))

    def cross_names(self) -> list[str]:
        return self.names("cross")


def captioning(model: Any) -> bool:
    """An image-to-text model whose text decoder cross-attends to a vision tower (BLIP's captioning head)."""
    return hasattr(model, "vision_model") and hasattr(model, "text_decoder")


def image_input(model: Any) -> tuple[int, int, int] | None:
    """(channels, height, width) of a captioning model's pixel_values (its vision config's fixed image size)."""
    if not captioning(model):
        return None
    vision = model.config.vision_config
    size = int(vision.image_size)
    return int(getattr(vision, "num_channels", 3)), size, size


def audio_input(model: Any) -> tuple[int, int] | None:
    """(mel bins, frames) of a speech encoder-decoder's input features (Whisper: 2 × max_source_positions
    frames), None for a text one."""
    if getattr(model, "main_input_name", "input_ids") != "input_features":
        return None
    return int(model.config.num_mel_bins), 2 * int(model.config.max_source_positions)


def seq2seq_layout(model: Any) -> Seq2SeqLayout:
    """Layers, heads and head size of the decoder's caches, read off one eager prefill (T5's d_kv, BART's
    d_model / heads and Marian's differ in where the config keeps them)."""
    import torch

    with torch.inference_mode():
        out = _Prefill(model)(*_sample_source(model, 1), _start_ids(model, 1, 1))
    first, cross = out[1], out[-1]
    mels, frames = audio_input(model) or (0, 0)
    image = image_input(model)
    return Seq2SeqLayout(layers=(len(out) - 1) // 4, kv_heads=int(first.shape[1]), head_dim=int(first.shape[3]),
                         dtype=str(first.dtype).removeprefix("torch."), mels=mels, frames=frames,
                         encoder_length=int(cross.shape[2]) if frames or image else 0, image=image)


def _sample_source(model: Any, batch: int) -> tuple[Any, ...]:
    """The encoder's sample inputs: (input_ids, attention_mask), or (input_features,) for a speech model."""
    import torch

    fixed = audio_input(model) or image_input(model)
    if fixed:
        return (torch.randn(batch, *fixed, dtype=next(model.parameters()).dtype),)
    ids = torch.randint(3, 16, (batch, _TRACE_SOURCE))
    return ids, torch.ones_like(ids)


def component_io(name: str, cache: Seq2SeqLayout, vocab: int, dims: dict[str, DimRange]) -> IOSpec:
    """The canonical IOSpec of one component (see the module docstring)."""
    prefill = name == "prefill"
    kv = (cache.dtype, ("batch", cache.kv_heads))
    source: Any = cache.encoder_length if cache.fixed_source else "sequence"
    mask = [] if cache.fixed_source else [TensorSpec("attention_mask", "int64", ("batch", "sequence"))]
    if prefill:
        inputs = [cache.source, *mask, TensorSpec("decoder_input_ids", "int64", ("batch", "prefix"))]
    else:
        inputs = [TensorSpec("decoder_input_ids", "int64", ("batch", 1)), *mask]
        inputs += [TensorSpec(n, kv[0], (*kv[1], "past_sequence", cache.head_dim)) for n in cache.names("past_key_values")]
        inputs += [TensorSpec(n, kv[0], (*kv[1], source, cache.head_dim)) for n in cache.cross_names()]
    outputs = [TensorSpec("logits", "float32", ("batch", 1, vocab)), TensorSpec("next_token", "int64", ("batch", 1))]
    length = "prefix" if prefill else "total_sequence"
    outputs += [TensorSpec(n, kv[0], (*kv[1], length, cache.head_dim)) for n in cache.names("present")]
    if prefill:
        outputs += [TensorSpec(n, kv[0], (*kv[1], source, cache.head_dim)) for n in cache.cross_names()]
    used = {d for s in inputs + outputs for d in s.shape if isinstance(d, str)}
    values = {"input_ids": {"kind": "randint", "low": 0, "high": vocab}, "attention_mask": {"kind": "ones"},
              "decoder_input_ids": {"kind": "randint", "low": 0, "high": vocab},
              "input_features": {"kind": "uniform", "low": -1.0, "high": 1.0},  # Whisper's log-mel range
              "pixel_values": {"kind": "normal"}}
    return IOSpec(inputs=inputs, outputs=outputs, dims={k: v for k, v in dims.items() if k in used},
                  values={k: v for k, v in values.items() if k in {s.name for s in inputs}})


def export_seq2seq(model: Any, work: Path, dims: dict[str, DimRange], *, opset: int | None = None) -> GenerationExport:
    """Export `model` (a transformers encoder-decoder LM, FP32 or the dtype of a native export) to
    work/prefill.onnx and work/decode.onnx."""
    cache = seq2seq_layout(model)
    vocab = vocab_of(model)
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


def vocab_of(model: Any) -> int:
    """The LM head's vocabulary (BLIP keeps its head in the text decoder)."""
    head = model.get_output_embeddings()
    if head is None and captioning(model):
        head = model.text_decoder.get_output_embeddings()
    return int(head.weight.shape[0])


def decoder_positions(model: Any) -> int | None:
    """How many positions the decoder has learned embeddings for (None: relative positions, T5)."""
    config = model.config.text_config if captioning(model) else model.config
    found = getattr(config, "max_target_positions", None) or getattr(config, "max_position_embeddings", None)
    return int(found) if found else None


def decoder_start(model: Any) -> int | None:
    """The decoder's first token: the generation config's decoder_start_token_id, else the config's; BLIP's
    captioning decoder starts at its text config's bos (its generate() writes that over the prompt's first id)."""
    if captioning(model):
        return getattr(model.config.text_config, "bos_token_id", None)
    start = getattr(model.generation_config, "decoder_start_token_id", None)
    return getattr(model.config, "decoder_start_token_id", None) if start is None else start


def _start_ids(model: Any, batch: int, length: int) -> Any:
    import torch

    return torch.full((batch, length), int(decoder_start(model) or 0), dtype=torch.int64)


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

            def forward(self, source: Any, *rest: Any) -> tuple[Any, ...]:
                # text: (input_ids, attention_mask, decoder_input_ids); speech: (input_features, decoder_input_ids);
                # captioning: (pixel_values, decoder_input_ids)
                mask, decoder_input_ids = (None, rest[0]) if len(rest) == 1 else rest
                kv = EncoderDecoderCache(DynamicCache(), DynamicCache())
                if captioning(self.lm):
                    images = self.lm.vision_model(pixel_values=source, return_dict=True).last_hidden_state
                    out = self.lm.text_decoder(input_ids=decoder_input_ids, encoder_hidden_states=images, use_cache=True,
                                               return_dict=True, **{_cache_kwarg(self.lm.text_decoder): kv})
                    return (out.logits[:, -1:], *_flat(kv.self_attention_cache), *_flat(kv.cross_attention_cache))
                if mask is None:
                    encoded = self.lm.get_encoder()(input_features=source, return_dict=True)
                    more = {}
                else:
                    encoded = self.lm.get_encoder()(input_ids=source, attention_mask=mask, return_dict=True)
                    more = {"attention_mask": mask}
                out = self.lm(encoder_outputs=encoded, decoder_input_ids=decoder_input_ids, use_cache=True,
                              return_dict=True, **{_cache_kwarg(self.lm): kv}, **more)
                return (out.logits[:, -1:], *_flat(kv.self_attention_cache), *_flat(kv.cross_attention_cache))

        return Prefill(model)


class _Decode:
    """One decoder step from the self-attention cache and the cross-attention keys/values."""

    def __new__(cls, model: Any) -> Any:
        import torch
        from transformers import DynamicCache, EncoderDecoderCache
        from transformers.modeling_outputs import BaseModelOutput

        audio = audio_input(model) is not None or captioning(model)  # no encoder mask: a fixed-size source

        class Decode(torch.nn.Module):
            def __init__(self, lm: Any):
                super().__init__()
                self.lm = lm

            def forward(self, decoder_input_ids: Any, *rest: Any) -> tuple[Any, ...]:
                attention_mask, caches = (None, rest) if audio else (rest[0], rest[1:])
                half = len(caches) // 2
                own, cross = DynamicCache(), DynamicCache()
                for i in range(half // 2):
                    own.update(caches[2 * i], caches[2 * i + 1], i)
                    cross.update(caches[half + 2 * i], caches[half + 2 * i + 1], i)
                kv = EncoderDecoderCache(own, cross)  # cross layers filled: their projections are not run again
                # The encoder's output is not read once the cross cache is filled; the model still wants an
                # encoder_outputs object (and its batch/length) to skip the encoder: a zero-width stand-in.
                hidden = caches[half][:, 0, :, :1] if audio else attention_mask[:, :, None].to(caches[0].dtype)
                if captioning(self.lm):
                    out = self.lm.text_decoder(input_ids=decoder_input_ids, encoder_hidden_states=hidden, use_cache=True,
                                               return_dict=True, **{_cache_kwarg(self.lm.text_decoder): kv})
                    return (out.logits, *_flat(kv.self_attention_cache))
                more = {} if audio else {"attention_mask": attention_mask}
                out = self.lm(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), decoder_input_ids=decoder_input_ids,
                              use_cache=True, return_dict=True, **{_cache_kwarg(self.lm): kv}, **more)
                return (out.logits, *_flat(kv.self_attention_cache))

        return Decode(model)


def _export_graphs(model: Any, cache: Seq2SeqLayout, opset: int | None) -> dict[str, Any]:
    import torch

    dtype = next(model.parameters()).dtype
    b, s, q, p = _TRACE_BATCH, _TRACE_SOURCE, _TRACE_PREFIX, _TRACE_PAST
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("sequence", min=1, max=1 << 16)
    positions = decoder_positions(model) or (1 << 12)  # the decoder's learned positions bound its lengths
    prefix = torch.export.Dim("prefix", min=1, max=min(1 << 12, positions))
    past_dim = torch.export.Dim("past_sequence", min=1, max=min(1 << 12, positions - 1))
    source = _sample_source(model, b)
    if cache.fixed_source:  # fixed-size features or pixels: the cross keys/values have the encoder's fixed length
        s = cache.encoder_length
        source_shapes: tuple[Any, ...] = ({0: batch},)
        mask_in: list[Any] = []
        mask_shape: list[Any] = []
        cross_dim: dict[int, Any] = {0: batch}
        names = [cache.source.name]
    else:
        source_shapes, mask_in, mask_shape = ({0: batch, 1: seq}, {0: batch, 1: seq}), [source[1]], [{0: batch, 1: seq}]
        cross_dim, names = {0: batch, 2: seq}, ["input_ids", "attention_mask"]
    kv = 2 * cache.layers
    plans = {
        # forward(source, *rest): the varargs' shapes are one nested tuple
        "prefill": (_Prefill(model), (*source, _start_ids(model, b, q)),
                    (source_shapes[0], (*source_shapes[1:], {0: batch, 1: prefix})),
                    [*names, "decoder_input_ids"], ["logits", *cache.names("present"), *cache.cross_names()]),
        "decode": (_Decode(model), (_start_ids(model, b, 1), *mask_in,
                                    *[torch.randn(b, cache.kv_heads, p, cache.head_dim, dtype=dtype) for _ in range(kv)],
                                    *[torch.randn(b, cache.kv_heads, s, cache.head_dim, dtype=dtype) for _ in range(kv)]),
                   ({0: batch}, (*mask_shape, *([{0: batch, 2: past_dim}] * kv + [cross_dim] * kv))),
                   ["decoder_input_ids", *names[1:], *cache.names("past_key_values"), *cache.cross_names()],
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
