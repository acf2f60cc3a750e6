"""Causal LMs → two ONNX graphs with the KV cache as explicit inputs and outputs.

    prefill: input_ids, attention_mask, position_ids [batch, sequence]
             → logits [batch, 1, vocab], next_token [batch, 1], present.{i}.key/value [batch, kv_heads, sequence, head_dim]
    decode:  input_ids, position_ids [batch, 1], attention_mask [batch, total_sequence],
             past_key_values.{i}.key/value [batch, kv_heads, past_sequence, head_dim]
             → logits, next_token, present.{i}.key/value [batch, kv_heads, total_sequence, head_dim]

Why two graphs and not one that also takes a past of length 0: ONNX Runtime's CUDA
GroupQueryAttention (fused by transformers' `fuse_for_onnxruntime`) takes several new tokens
after a past only for a batch of one, so a graph whose query length is dynamic keeps the slower
MultiHeadAttention at batch 8; a decode graph with one new token is fused at every batch, and its
shapes are what a CUDA graph needs. The prefill keeps only the last position's logits (the
hidden states are sliced before the LM head): a 128-token prompt on a 152k vocabulary would
otherwise copy 78 MB of logits per prompt. `next_token` (ArgMax of the logits) lets greedy
decoding fetch 8 bytes a row instead of the whole vocabulary from the GPU.

First choice: transformers' own decomposition (`transformers.exporters.utils.decompose_for_generation`
captures each stage's forward inputs from a real `generate()`), exported with its `OnnxExporter`
(which patches ops ONNX cannot lower), then renamed to the names above. Where that fails, a
generic wrapper builds a DynamicCache from the past tensors and exports with torch.onnx directly.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from exporter.export.graph import _condense, quiet, set_metadata
from exporter.export.onnxutil import METADATA_DIMS, METADATA_VALUES
from runtimes.errors import ExportError
from runtimes.manifest import DimRange, IOSpec, TensorSpec

COMPONENTS = ("prefill", "decode")
_CACHE_NAME = re.compile(r"layers\.(\d+)\.(keys|values)$")
# Sample sizes for tracing: distinct from each other and from 0/1 (torch.export specializes those).
_TRACE_BATCH, _TRACE_PROMPT = 2, 7
# torch.onnx's `optimize=True` runs onnxscript's generic rewrite rules, ~70% of the export time on a
# 30-layer model (SmolLM2-135M: 270 of 460 s in a profile), for graphs that fuse_for_ort and ONNX
# Runtime's own optimizer rewrite again anyway; constant folding alone is kept (_fold).


@dataclass
class CacheLayout:
    """What the KV cache looks like: per layer a key and a value [batch, kv_heads, length, head_dim]."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str = "float32"

    def names(self, prefix: str) -> list[str]:
        return [f"{prefix}.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")]


@dataclass
class GraphExport:
    path: Path
    io: IOSpec


@dataclass
class GenerationExport:
    components: dict[str, GraphExport]
    cache: CacheLayout
    exporter: str
    opset: int
    notes: list[str] = field(default_factory=list)
    builder: Any = None  # a VLM's one-graph decoder: the GenaiExport of ONNX Runtime GenAI's builder (recipes/vlm_genai.py)


def cache_layout(config: Any) -> CacheLayout:
    text = getattr(config, "text_config", None) or config
    heads = int(text.num_attention_heads)
    kv = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    return CacheLayout(int(text.num_hidden_layers), kv, head_dim)


def component_io(name: str, cache: CacheLayout, vocab: int, dims: dict[str, DimRange], *,
                 embeds: int | None = None, mrope: bool = False, deepstack: int = 0) -> IOSpec:
    """The canonical IOSpec of one component (see the module docstring). embeds: the decoder takes
    inputs_embeds of that width instead of input_ids (VLMs); mrope: 3 position rows (Qwen2-VL);
    deepstack: the prefill also takes Qwen3-VL's deepstack_embeds [levels, batch, sequence, embeds]."""
    seq = "sequence" if name == "prefill" else 1
    kv_in = "sequence" if name == "prefill" else "total_sequence"
    pos_shape: tuple[Any, ...] = (3, "batch", seq) if mrope else ("batch", seq)
    first = (TensorSpec("inputs_embeds", "float32", ("batch", seq, embeds)) if embeds
             else TensorSpec("input_ids", "int64", ("batch", seq)))
    inputs = [first, TensorSpec("attention_mask", "int64", ("batch", kv_in)),
              TensorSpec("position_ids", "int64", pos_shape)]
    if deepstack and name == "prefill":
        inputs.append(TensorSpec("deepstack_embeds", "float32", (deepstack, "batch", seq, embeds)))
    if name == "decode":
        inputs += [TensorSpec(n, cache.dtype, ("batch", cache.kv_heads, "past_sequence", cache.head_dim))
                   for n in cache.names("past_key_values")]
    outputs = [TensorSpec("logits", "float32", ("batch", 1, vocab)), TensorSpec("next_token", "int64", ("batch", 1))]
    outputs += [TensorSpec(n, cache.dtype, ("batch", cache.kv_heads, kv_in, cache.head_dim)) for n in cache.names("present")]
    used = {d for s in inputs for d in s.shape if isinstance(d, str)}
    values = {"input_ids": {"kind": "randint", "low": 0, "high": vocab}, "attention_mask": {"kind": "ones"},
              "position_ids": {"kind": "positions"}}
    return IOSpec(inputs=inputs, outputs=outputs, dims={k: v for k, v in dims.items() if k in used},
                  values={k: v for k, v in values.items() if k in {s.name for s in inputs}})


def export_generation(model: Any, work: Path, dims: dict[str, DimRange], *, exporter: str = "auto",
                      opset: int | None = None, vlm: bool = False, deepstack: int = 0) -> GenerationExport:
    """Export `model` (a transformers causal LM in FP32) to work/prefill.onnx and work/decode.onnx.
    vlm: the language decoder of a Qwen2-VL-family VLM (exporter/export/vlm.py): inputs_embeds [batch, seq,
    hidden] instead of input_ids, and M-RoPE position_ids [3, batch, seq]; deepstack: Qwen3-VL's levels, a
    prefill input (see component_io)."""
    cache = cache_layout(model.config)
    cache.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    vocab = int(model.get_output_embeddings().weight.shape[0])
    embeds = int(model.get_input_embeddings().weight.shape[1]) if vlm else None
    notes: list[str] = []
    graphs = None
    if vlm:
        # transformers 5.23's decompose_for_generation splits a Qwen2-VL into its text model (hidden
        # states, no LM head) and a decode stage of the whole model taking input_ids, and finds no image
        # encoder (get_encoder("image") is not the visual tower): not the two decoder graphs on
        # inputs_embeds wanted here, so the generic wrapper exports them.
        if exporter == "transformers":
            raise ExportError("--exporter transformers cannot export a VLM's decoder on inputs_embeds (transformers' "
                              "decomposition of Qwen2-VL has no such stages); use --exporter auto")
        notes.append("decoder: generic wrapper on inputs_embeds (transformers' decomposition has no such stages)")
    elif exporter == "auto" and sliding_window(model.config):
        # transformers' decomposition keeps a sliding layer's cache at the window (plus a
        # _sliding_window_tensor output): layers whose past lengths differ, which enginekit's one
        # past_sequence dim cannot carry. The wrapper keeps every layer's whole cache; the model's own
        # mask function limits attention to the window, so a prompt past it computes what transformers does.
        notes.append(f"sliding window {sliding_window(model.config)}: generic wrapper with full-length caches "
                     "(attention limited to the window by the model's mask)")
    elif exporter in ("auto", "transformers"):
        try:
            graphs = _export_with_transformers(model, opset)
            used = "transformers.exporters (decompose_for_generation + OnnxExporter)"
        except ExportError as exc:
            if exporter == "transformers":
                raise
            notes.append(f"transformers' exporter failed ({str(exc)[:300]}); exported with the generic wrapper")
    if graphs is None:
        graphs = _export_with_wrapper(model, cache, opset, embeds=embeds, deepstack=deepstack)
        used = "torch.onnx.export (dynamo) of a generic KV-cache wrapper"
    out: dict[str, GraphExport] = {}
    opset_used = 0
    for name in COMPONENTS:
        io = component_io(name, cache, vocab, dims, embeds=embeds, mrope=vlm, deepstack=deepstack)
        path = Path(work) / f"{name}.onnx"
        opset_used = _finalize(graphs[name], io, path, cache)
        out[name] = GraphExport(path, io)
    return GenerationExport(out, cache, used, opset_used, notes)


# -- transformers' decomposition -------------------------------------------------------------------------
def _sample_prompt(model: Any) -> dict[str, Any]:
    """A padded batch: a padded row keeps attention_mask an input of the captured graphs."""
    import torch

    vocab = int(model.get_output_embeddings().weight.shape[0])
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, max(4, vocab), (_TRACE_BATCH, _TRACE_PROMPT), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _export_with_transformers(model: Any, opset: int | None) -> dict[str, Any]:
    try:
        from transformers.exporters import OnnxConfig, OnnxExporter
        from transformers.exporters.utils import decompose_prefill_decode
    except ImportError as exc:
        raise ExportError(f"transformers.exporters is not available ({exc}); transformers 5.x has it") from None
    import logging

    from transformers.exporters import exporter_dynamo

    # Its loggers are named after their files, outside quiet()'s reach: the Dim.AUTO hint is noise here.
    dynamo_log = getattr(exporter_dynamo, "logger", logging.getLogger("transformers.exporters"))
    level = dynamo_log.level
    dynamo_log.setLevel(logging.ERROR)
    try:
        return _decompose_and_export(model, opset, OnnxConfig, OnnxExporter, decompose_prefill_decode)
    finally:
        dynamo_log.setLevel(level)


def _decompose_and_export(model: Any, opset: int | None, OnnxConfig: Any, OnnxExporter: Any,
                          decompose_prefill_decode: Any) -> dict[str, Any]:
    with quiet():
        try:
            stages = decompose_prefill_decode(model, _sample_prompt(model))
        except Exception as exc:  # generate() raises many types
            raise ExportError(f"capturing generate() failed: {_condense(exc, 300)}") from None
        graphs = {}
        for name in COMPONENTS:
            submodel, inputs = stages[name]
            inputs = dict(inputs)
            if name == "prefill":
                inputs["logits_to_keep"] = 1  # the LM head on the last position only
            # transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name is a
            # deprecated alias until 5.40); the captured stages take whichever the installed one uses.
            unknown = set(inputs) - {"input_ids", "attention_mask", "position_ids", "past_key_values", "cache",
                                     "use_cache", "return_dict", "logits_to_keep", "cache_position"}
            if unknown:
                raise ExportError(f"the {name} stage takes inputs enginekit does not feed: {sorted(unknown)}")
            try:
                exported = OnnxExporter().export(submodel, inputs, OnnxConfig(dynamic=True, opset_version=opset,
                                                                              optimize=False))
            except Exception as exc:  # the exporter wraps torch errors in RuntimeError
                raise ExportError(f"exporting the {name} stage failed: {_condense(exc, 300)}") from None
            graphs[name] = _ir_model(exported)
    return graphs


def _ir_model(exported: Any) -> Any:
    """The onnx_ir model inside what OnnxExporter.export returned: an ExportedModel whose `.program` is
    torch's ONNXProgram (transformers 5.24), or the ONNXProgram itself."""
    program = getattr(exported, "program", exported)
    model = getattr(program, "model", program)
    if not hasattr(model, "graph"):
        raise ExportError(f"Expected transformers' OnnxExporter to return an ONNX program, found {type(exported).__name__}")
    return model


# -- the generic wrapper ---------------------------------------------------------------------------------
def _export_with_wrapper(model: Any, cache: CacheLayout, opset: int | None, *,
                         embeds: int | None = None, deepstack: int = 0) -> dict[str, Any]:
    """embeds: the graphs take inputs_embeds of that width and 3-row M-RoPE positions, and run the
    VLM's language model (model.model.language_model) and LM head, not the whole model; deepstack: the
    prefill takes Qwen3-VL's dense deepstack_embeds after position_ids (see component_io)."""
    import torch
    from transformers import DynamicCache

    class Step(torch.nn.Module):
        def __init__(self, lm: Any, with_past: bool):
            super().__init__()
            self.lm, self.with_past = lm, with_past
            self.deep = bool(deepstack) and not with_past

        def forward(self, first: Any, attention_mask: Any, position_ids: Any, *rest: Any) -> tuple[Any, ...]:
            levels, past = (rest[0], rest[1:]) if self.deep else (None, rest)
            # Sliding-window models get plain full-length layers (see export_generation).
            kv = DynamicCache() if sliding_window(self.lm.config) else DynamicCache(config=self.lm.config)
            for i in range(len(past) // 2):
                kv.update(past[2 * i], past[2 * i + 1], i)
            if embeds:
                lm = self.lm.model.language_model
                more = {"visual_pos_masks": None, "deepstack_visual_embeds": list(levels.unbind(0))} if self.deep else {}
                out = lm(inputs_embeds=first, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{_cache_kwarg(lm): kv}, **more)
                logits = self.lm.lm_head(out.last_hidden_state[:, -1:])
            else:
                out = self.lm(input_ids=first, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=True, logits_to_keep=1, return_dict=True, **{_cache_kwarg(self.lm): kv})
                logits = out.logits
            flat = [t for layer in _cache_of(out).layers for t in (layer.keys, layer.values)]
            return (logits, *flat)

    # Sample tensors in the model's dtype: a BF16/FP16 export (--lowering native) with an FP32 past fails
    # in attention ("Expected query, key, and value to have the same dtype").
    dtype = next(model.parameters()).dtype
    b, s, p = _TRACE_BATCH, _TRACE_PROMPT, _TRACE_PROMPT + 2
    batch = torch.export.Dim("batch", min=1, max=1024)
    graphs = {}
    for name in COMPONENTS:
        decode = name == "decode"
        q = 1 if decode else s
        first = torch.randn(b, q, embeds, dtype=dtype) if embeds else torch.randint(0, 16, (b, q))
        total = p + q if decode else q
        mask = torch.ones(b, total, dtype=torch.int64)
        pos = torch.arange(total - q, total).expand(b, q).contiguous()
        if embeds:
            pos = pos.expand(3, b, q).contiguous()
        past = [torch.randn(b, cache.kv_heads, p, cache.head_dim, dtype=dtype) for _ in range(2 * cache.layers)] if decode else []
        levels = [torch.randn(deepstack, b, q, embeds, dtype=dtype)] if deepstack and not decode else []
        seq = torch.export.Dim("sequence", min=1, max=1 << 16)
        past_dim = torch.export.Dim("past_sequence", min=1, max=1 << 16)
        tokens = {0: batch, **({} if decode else {1: seq})}
        shapes: list[Any] = [tokens, {0: batch, 1: (past_dim + 1) if decode else seq},
                             {1: batch, **({} if decode else {2: seq})} if embeds else tokens]
        if levels or past:  # the *rest varargs (deepstack levels, then the past): one nested entry
            shapes.append(tuple([{1: batch, 2: seq} for _ in levels] + [{0: batch, 2: past_dim} for _ in past]))
        with quiet(), _dense_deepstack(model if levels else None):
            try:
                ep = torch.export.export(Step(model, decode).eval(), (first, mask, pos, *levels, *past),
                                         dynamic_shapes=tuple(shapes), strict=False,
                                         prefer_deferred_runtime_asserts_over_guards=True)
                names = ["inputs_embeds" if embeds else "input_ids", "attention_mask", "position_ids"]
                names += ["deepstack_embeds"] * len(levels) + (cache.names("past_key_values") if decode else [])
                graphs[name] = torch.onnx.export(ep, (first, mask, pos, *levels, *past), dynamo=True, opset_version=opset,
                                                 input_names=names, output_names=["logits", *cache.names("present")],
                                                 optimize=False, verbose=False).model
            except Exception as exc:  # torch.export / torch.onnx raise many types
                what = "the wrapper" if embeds else "both transformers' exporter and the generic wrapper"
                raise ExportError(
                    f"Expected the {'VLM decoder' if embeds else 'causal LM'} to export as {name} graph with its KV "
                    f"cache as inputs and outputs, but {what} failed: {_condense(exc, 600)} Report this model; "
                    "--exporter transformers shows transformers' own error."
                ) from None
    return graphs


@contextlib.contextmanager
def _dense_deepstack(model: Any) -> Iterator[None]:
    """Qwen3-VL's text model adds a deepstack level at the image tokens (`_deepstack_process`: a boolean-mask
    gather and scatter, data-dependent shapes in the graph). For the export it adds the dense level instead
    (zero off the image tokens, so the sum is the same); the model is restored after. model None: no-op."""
    if model is None:
        yield
        return
    lm = model.model.language_model
    lm._deepstack_process = lambda hidden, _mask, level: hidden + level.to(hidden.dtype)
    try:
        yield
    finally:
        del lm._deepstack_process


def sliding_window(config: Any) -> int | None:
    """The sliding attention window of a causal LM's (text) config, None without one."""
    text = getattr(config, "text_config", None) or config
    window = getattr(text, "sliding_window", None)
    return int(window) if window else None


def _cache_kwarg(module: Any) -> str:
    """The forward's name for the KV cache: `cache` since transformers 5.24, `past_key_values` before
    (still accepted, deprecated, until 5.40)."""
    import inspect

    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _cache_of(out: Any) -> Any:
    """The cache a forward returned (`out.cache` since transformers 5.24, `out.past_key_values` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


# -- naming and finishing --------------------------------------------------------------------------------
def _canonical(name: str, position: int, kind: str) -> str | None:
    m = _CACHE_NAME.search(name)
    if m:
        layer, which = m.group(1), "key" if m.group(2) == "keys" else "value"
        return f"{'past_key_values' if kind == 'input' else 'present'}.{layer}.{which}"
    return None


def _finalize(model: Any, io: IOSpec, path: Path, cache: CacheLayout) -> int:
    """Rename inputs/outputs and dims to the canonical ones, add `next_token`, save and check."""
    import onnx_ir as ir

    _fold(model)
    graph = model.graph
    want_in = [s.name for s in io.inputs]
    by_name = {v.name: v for v in graph.inputs}
    renamed_in = {}
    for i, v in enumerate(graph.inputs):
        canon = v.name if v.name in want_in else _canonical(v.name, i, "input")
        if canon is None and v.name.startswith("input."):
            canon = v.name.removeprefix("input.")
        renamed_in[v.name] = canon
    outs = list(graph.outputs)
    cache_names = cache.names("present")
    if len(outs) != 1 + len(cache_names):
        raise ExportError(f"Expected logits and {len(cache_names)} cache outputs, found outputs {[o.name for o in outs]}.")
    missing = [n for n in want_in if n not in renamed_in.values()]
    extra = [k for k, v in renamed_in.items() if v not in want_in]
    if missing or extra:
        raise ExportError(
            f"Expected the graph inputs {want_in}, found {list(by_name)} (missing {missing}, unexpected {extra})."
        )
    for v in graph.inputs:
        v.name = renamed_in[v.name]
    outs[0].name = "logits"
    for v, canon in zip(outs[1:], cache_names):
        got = _canonical(v.name, 0, "output") or v.name
        v.name = canon if got.startswith("present") or got == v.name else got
    if outs[0].dtype not in (None, ir.DataType.FLOAT):
        # A model exported in FP16/BF16: FP32 logits for sampling on the host and for the gate.
        cast = ir.node("Cast", [outs[0]], attributes={"to": ir.DataType.FLOAT}, name="enginekit_logits_fp32")
        graph.append(cast)
        outs[0].name = "logits_native"
        cast.outputs[0].name, cast.outputs[0].dtype, cast.outputs[0].shape = "logits", ir.DataType.FLOAT, outs[0].shape
        graph.outputs[0] = cast.outputs[0]
        outs[0] = cast.outputs[0]
    # Greedy decoding reads 8 bytes a row instead of the vocabulary.
    argmax = ir.node("ArgMax", [outs[0]], attributes={"axis": -1, "keepdims": 0}, name="enginekit_next_token")
    argmax.outputs[0].name = "next_token"
    argmax.outputs[0].dtype = ir.DataType.INT64
    graph.append(argmax)
    graph.outputs.insert(1, argmax.outputs[0])
    order = {s.name: i for i, s in enumerate(io.inputs)}
    inputs = sorted(graph.inputs, key=lambda v: order[v.name])
    graph.inputs.clear()
    graph.inputs.extend(inputs)
    return save_checked(model, io, path)


def save_checked(model: Any, io: IOSpec, path: Path) -> int:
    """Save an onnx_ir model (weights as external data past 1 GiB), give its dims the canonical
    names, run the ONNX checker; returns the opset."""
    import onnx_ir as ir

    big = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None) > (1 << 30)
    ir.save(model, str(path), external_data=(path.name + ".data") if big else None)
    proto = onnx.load(str(path), load_external_data=False)
    _name_dims(proto, io)
    set_metadata(proto, {METADATA_DIMS: "{}", METADATA_VALUES: "{}"})
    onnx.save(proto, str(path))
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # ValidationError
        raise ExportError(f"Expected the exported {path.stem} graph to pass the ONNX checker, but: {_condense(exc, 300)}") from None
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _fold(model: Any) -> None:
    """Constant folding and dead-node removal, without onnxscript's pattern rewrites."""
    import logging

    import onnx_ir as ir
    from onnx_ir.passes import common as common_passes
    from onnxscript.optimizer import _constant_folding

    log = logging.getLogger("onnx_ir")
    level = log.level
    log.setLevel(logging.WARNING)  # its INFO lines ("Removed 5 unused nodes") are noise on the CLI
    try:
        ir.passes.PassManager([_constant_folding.FoldConstantsPass(shape_inference=True, input_size_limit=8192,
                                                                  output_size_limit=8192),
                               common_passes.RemoveUnusedNodesPass()])(model)
    finally:
        log.setLevel(level)


def _name_dims(proto: onnx.ModelProto, io: IOSpec) -> None:
    """Give the exporter's symbols (s44, 's36 + 1') the canonical dim names, read off the inputs."""
    mapping: dict[str, str] = {}
    specs = {s.name: s for s in io.inputs + io.outputs}
    values = list(proto.graph.input) + list(proto.graph.output)
    for vi in values:
        spec = specs.get(vi.name)
        if spec is None:
            continue
        for d, want in zip(vi.type.tensor_type.shape.dim, spec.shape):
            if isinstance(want, str) and d.dim_param and d.dim_param not in mapping:
                mapping[d.dim_param] = want
    for vi in values + list(proto.graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in mapping:
                d.dim_param = mapping[d.dim_param]
            elif d.dim_param.isdigit():
                # A dynamic export names some fixed sizes as symbols ("2"): ONNX Runtime would plan
                # buffers by the name, and the fusions read sizes only from values.
                size = int(d.dim_param)
                d.Clear()
                d.dim_value = size
    for vi in values:
        spec = specs.get(vi.name)
        if spec is None:
            continue
        if not vi.type.tensor_type.HasField("shape"):
            for _ in spec.shape:
                vi.type.tensor_type.shape.dim.add()
        for d, want in zip(vi.type.tensor_type.shape.dim, spec.shape):
            if isinstance(want, str) and d.dim_param != want:
                d.Clear()
                d.dim_param = want
            elif isinstance(want, int) and not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = want


