"""A Qwen2.5-VL / Qwen3-VL text decoder as ONE graph: ONNX Runtime GenAI's model builder writes it on
`inputs_embeds` (its `exclude_embeds` option), enginekit rewrites the graph's edges, and prefill and decode run in
the same session, so the decoder's weights are held once (enginekit's own export holds them twice, once per graph:
2 x 16.4 GB in BF16 for Qwen3-VL-8B).

    decoder: inputs_embeds [batch, sequence, hidden] (FP32), position_ids [3, batch, sequence] (M-RoPE),
             attention_mask [batch, total_sequence], past_key_values.* (empty for the prefill)
             (+ Qwen3-VL: deepstack_embeds [levels, batch, sequence, hidden], FP32, zero off the image tokens)
             → logits [batch, 1, vocab] (FP32, each row's last real position), next_token [batch, 1], present.*

What the builder writes (onnxruntime-genai 0.18, `Qwen25VLTextModel` / `Qwen3VLTextModel`): GroupQueryAttention
over the cache, its MRotaryEmbedding on the 3-D positions (Qwen3-VL's interleaved sections included), logits for
every position. What it lacks, added here with onnx_ir (the weights stay where the builder wrote them: an onnx_ir
save without `external_data` keeps every external tensor's location, so 16 GB are not rewritten):

- Qwen3-VL's deepstack: level i of `deepstack_embeds` is added to decoder layer i's MLP output before layer i+1's
  SkipSimplifiedLayerNormalization sums it into the residual stream (cast to that node's skip dtype: the builder
  computes those norms in FP32), which equals transformers' add to the hidden states at the image tokens.
- FP32 `inputs_embeds` and `deepstack_embeds` cast to the model's dtype inside the graph: the runtime's embedding
  rows are FP32 numpy, and numpy has no BF16.
- `logits` of each row's last real position and its `next_token` (ArgMax on the GPU): the runtime's loop reads one
  position per row. Rows are RIGHT-padded for this graph (GroupQueryAttention takes each row's length from the
  mask's sum and its tokens from the front of the row; measured on the tiny Qwen3-VL: a right-padded batch of
  lengths 10 and 6 gives the single rows' logits exactly over 5 decode steps), so the last real position is
  min(sum(mask) - 1, sequence - 1): sum - 1 in the prefill, 0 in a decode step (the sequence length summed on the
  device: CUDA graph capture needs every node on the CUDA provider, and ORT puts Shape arithmetic on the CPU).
- The head dim for the cache's symbolic `kv_cache_dim`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from exporter.export.genai import GenaiExport, build_decoder, decoder_io, op_counts
from runtimes.choices import Precision
from runtimes.errors import ExportError
from runtimes.manifest import DimRange

# The VLM model_types whose text decoder the builder writes (its Qwen25VLTextModel / Qwen3VLTextModel).
BUILDER_VLMS = ("qwen2_5_vl", "qwen3_vl")


def build_vlm_decoder(source: Path, out: Path, work: Path, precision: Precision, device: str,
                      dims: dict[str, DimRange], vocab: int, levels: int, head_dim: int) -> GenaiExport:
    """The builder on the VLM's HF folder (`source`) into `out`, then the rewrite (module docstring)."""
    import onnx

    built = build_decoder(source, out, work, precision, device, dims, vocab, more_options={"exclude_embeds": "true"})
    rewrite(out / "model.onnx", levels, head_dim)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    io = decoder_io(graph, dims, vocab)
    values = {"inputs_embeds": {"kind": "normal"}, **({"deepstack_embeds": {"kind": "normal"}} if levels else {})}
    return GenaiExport(out, replace(io, values=values), {**built.options, "rewrite": _rewrite_note(levels)},
                       op_counts(graph))


def _rewrite_note(levels: int) -> str:
    return ("enginekit: FP32 inputs_embeds" + (f", deepstack_embeds added before layers 1..{levels}" if levels else "")
            + ", last-position logits and next_token (right-padded rows)")


def rewrite(path: Path, levels: int, head_dim: int) -> None:
    """Rewrite the builder's graph at `path` in place (weights untouched): see the module docstring."""
    import onnx_ir as ir

    model = ir.load(str(path))
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    missing = [n for n in ("inputs_embeds", "attention_mask", "position_ids") if n not in inputs]
    if missing or "logits" not in {v.name for v in graph.outputs}:
        raise ExportError(f"Expected the model builder's VLM decoder to take inputs_embeds, attention_mask and "
                          f"position_ids and give logits, found inputs {sorted(inputs)[:6]} (missing {missing}). "
                          "Report this onnxruntime-genai version.")
    first = next(iter(graph))
    embeds = _fp32_input(graph, inputs["inputs_embeds"], first)
    if levels:
        _add_deepstack(graph, embeds, levels)
    _last_position_logits(graph, inputs["position_ids"], inputs["attention_mask"])
    for v in [*graph.inputs, *graph.outputs]:
        if v.name.startswith(("past_key_values.", "present.")) and v.shape is not None:
            v.shape = ir.Shape([head_dim if str(d) == "kv_cache_dim" else d for d in v.shape])
    ir.save(model, str(path))


def _fp32_input(graph: Any, value: Any, first: Any) -> Any:
    """Replace a graph input by an FP32 one of the same name cast to its dtype (a no-op for an FP32 model)."""
    import onnx_ir as ir

    if value.dtype == ir.DataType.FLOAT:
        return value
    fp32 = ir.Value(name=value.name, type=ir.TensorType(ir.DataType.FLOAT), shape=value.shape)
    value.name = f"{fp32.name}/model_dtype_input"
    cast = ir.node("Cast", [fp32], {"to": value.dtype}, name=f"/model/{fp32.name}/Cast")
    cast.outputs[0].name = f"/model/{fp32.name}/Cast/output_0"
    ir.convenience.replace_all_uses_with(value, cast.outputs[0])
    graph.inputs[graph.inputs.index(value)] = fp32
    graph.insert_before(first, cast)
    return fp32


def _add_deepstack(graph: Any, embeds: Any, levels: int) -> None:
    import onnx_ir as ir

    dims = list(embeds.shape) if embeds.shape is not None else ["batch_size", "sequence_length", None]
    deep = ir.Value(name="deepstack_embeds", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([levels, *dims]))
    graph.inputs.append(deep)
    norms = [n for n in graph if n.op_type == "SkipSimplifiedLayerNormalization"]
    for i in range(levels):
        target = next((n for n in norms if (n.name or "").startswith(f"/model/layers.{i + 1}/")), None)
        if target is None:
            raise ExportError(f"Expected a SkipSimplifiedLayerNormalization in decoder layer {i + 1} of the builder's "
                              f"graph for deepstack level {i}, found none. Report this onnxruntime-genai version.")
        skip = target.inputs[1]
        producer = skip.producer()
        dtype = (ir.DataType(producer.attributes.get_int("to")) if producer is not None and producer.op_type == "Cast"
                 else skip.dtype or embeds.dtype)
        index = ir.node("Constant", [], {"value": ir.tensor(np.array(i, np.int64))}, name=f"/model/deepstack.{i}/index")
        level = ir.node("Gather", [deep, index.outputs[0]], {"axis": 0}, name=f"/model/deepstack.{i}/Gather")
        new = [index, level]
        if dtype != ir.DataType.FLOAT:
            new.append(ir.node("Cast", [level.outputs[0]], {"to": dtype}, name=f"/model/deepstack.{i}/Cast"))
        new.append(ir.node("Add", [skip, new[-1].outputs[0]], name=f"/model/deepstack.{i}/Add"))
        for node in new:
            node.outputs[0].name = f"{node.name}/output_0"
        graph.insert_before(target, new)
        target.replace_input_with(1, new[-1].outputs[0])


def _last_position_logits(graph: Any, positions: Any, mask: Any) -> None:
    import onnx_ir as ir

    out = next(v for v in graph.outputs if v.name == "logits")
    position = graph.outputs.index(out)
    out.name = "/model/logits_all"
    new: list[Any] = []

    def add(op: str, ins: list[Any], attrs: dict[str, Any] | None = None, name: str | None = None) -> Any:
        node = ir.node(op, ins, attrs or {}, name=f"/model/last/{name or op}")
        node.outputs[0].name = f"{node.name}/output_0"
        new.append(node)
        return node.outputs[0]

    def const(name: str, values: list[int] | int) -> Any:
        return add("Constant", [], {"value": ir.tensor(np.array(values, np.int64))}, name=name)

    axis1, one, zero = const("axis1", [1]), const("one", [1]), const("zero", [0])
    logits = out if out.dtype == ir.DataType.FLOAT else add("Cast", [out], {"to": ir.DataType.FLOAT})
    total = add("ReduceSum", [mask, axis1], {"keepdims": 0})
    last = add("Sub", [total, one], name="SubMask")
    # The sequence length counted on the device (ones over position_ids' first row, summed), not by Shape: ORT puts
    # Shape arithmetic on the CPU, and one CPU node refuses CUDA graph capture for the whole session (the builder's
    # own graph captures; measured with onnxruntime-gpu 1.31.1, bench/results/vlm-one-graph/vlm_graph_probe.json).
    row = add("Gather", [positions, const("row", 0)], {"axis": 0}, name="Row")
    ones = add("Add", [add("Mul", [row, zero], name="Zero"), one], name="Ones")
    seq_last = add("Sub", [add("ReduceSum", [ones, axis1], {"keepdims": 0}, name="Sequence"), one], name="SubSeq")
    index = add("Unsqueeze", [add("Min", [last, seq_last]), axis1], name="Index")
    picked = add("GatherND", [logits, index], {"batch_dims": 1})
    final = add("Unsqueeze", [picked, axis1], name="Logits")
    final.name, final.type = "logits", ir.TensorType(ir.DataType.FLOAT)
    final.shape = ir.Shape([out.shape[0] if out.shape is not None else "batch_size", 1,
                            out.shape[-1] if out.shape is not None else None])
    token = add("ArgMax", [final], {"axis": -1, "keepdims": 0})
    token.name, token.type = "next_token", ir.TensorType(ir.DataType.INT64)
    token.shape = ir.Shape([final.shape[0], 1])
    graph.extend(new)
    graph.outputs[position] = final
    graph.outputs.insert(position + 1, token)
