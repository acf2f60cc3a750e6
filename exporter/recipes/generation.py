"""`enginekit build` for causal LMs: a generation bundle (prefill + decode engines, tokenizer,
stop tokens) gated on tokens against transformers' own generate().

    source ─▶ prefill.onnx, decode.onnx ─▶ lowered (fp16/bf16: AutoCast; int8: weight-only) ─▶
    ORT fusions (GroupQueryAttention on the decode graph) ─▶ engines ─▶ token parity ─▶ bundle

Sources: `hf:<folder>` whose config names a causal LM (…ForCausalLM / …LMHeadModel), and GGUF
checkpoints: `hf:<folder>#gguf=<file>`, `hf:<file.gguf>`, or a folder holding one .gguf and no
config.json (transformers dequantizes GGUF to FP32 with the `gguf` package; the tokenizer comes
from the GGUF too).

Bundle: prefill/model.onnx, decode/model.onnx (each + .data), tokenizer.json, generation.json,
manifest.json (io: the decode graph's), parity.json, report.html.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from exporter.build.engine import build_engine, unfuse_reason
from exporter.bundle.assemble import BuildResult, finish_bundle
from exporter.export.generation import GenerationExport, cache_layout, component_io, export_generation
from exporter.export.memory import check_memory
from exporter.export.vlm import vlm_model_type
from exporter.gate.task import check_tolerance_outputs
from exporter.gate.vision_language import VISION_OUTPUTS
from exporter.lower.mixed import keep_unrunnable_op, mixed_options
from exporter.options import build_command
from exporter.recipes.genai import build_genai_into, use_genai
from exporter.source.causal import DEFAULT_PROMPT, DEFAULT_TOTAL, generation_metadata, load_causal_lm
from exporter.source.spec import SourceSpec
from exporter.timing import Progress, timed
from runtimes._deps import version_of
from runtimes._version import __version__
from runtimes.choices import Precision
from runtimes.errors import BuildError, UsageError
from runtimes.generate import GENERATION_FILE, TOKENIZER_FILE
from runtimes.manifest import DimRange, IOSpec, Manifest, file_sha256


def default_dims(config: Any, shapes: dict[str, DimRange]) -> dict[str, DimRange]:
    """batch 1:1:16; prompt (sequence) and total length capped by the model's positions; past = total - 1."""
    text = getattr(config, "text_config", None) or config
    positions = int(getattr(text, "max_position_embeddings", None) or DEFAULT_TOTAL)
    total = shapes.get("total_sequence") or DimRange(2, min(256, positions), min(DEFAULT_TOTAL, positions))
    prompt = shapes.get("sequence") or DimRange(1, min(128, total.max - 1), min(DEFAULT_PROMPT, total.max - 1))
    batch = shapes.get("batch") or DimRange(1, 1, 16)
    unknown = sorted(set(shapes) - {"batch", "sequence", "total_sequence"})
    if unknown or total.max < 2:
        raise UsageError(
            f"Expected --shapes for a causal LM to name batch, sequence (the prompt) and total_sequence (prompt + new "
            f"tokens, at least 2), found {sorted(shapes)}. Example: --shapes batch=1:1:8,sequence=1:128:512,"
            "total_sequence=2:256:1024."
        )
    past = DimRange(1, max(1, min(total.opt - 1, total.max - 1)), total.max - 1)
    return {"batch": batch, "sequence": prompt, "past_sequence": past, "total_sequence": total}


def build_generation(spec: SourceSpec, source_text: str, options: Any, output: Path, staging: Path,
                     say: Progress) -> BuildResult:
    """Build, gate and publish a generation bundle (the generation and vision-language recipes)."""
    timings: dict[str, float] = {}
    manifest, report = _build_into(spec, source_text, options, output, staging, say, timings)
    return publish_generation(spec, options, output, staging, manifest, report, timings, "generation")


def publish_generation(spec: SourceSpec, options: Any, output: Path, staging: Path, manifest: Manifest, report: Any,
                       timings: dict[str, float], what: str) -> BuildResult:
    """The gate's evidence into the staged bundle, then the bundle published at `output` (or kept as
    `<output>.rejected` when the gate failed); `what` names the engines in the failure paragraph."""

    def failure(failures: str, rejected: Path) -> str:
        return (f"Expected the {options.precision} {what} engines to produce transformers' tokens, but the gate "
                f"failed: {failures}. Nothing was written to '{output}'; the rejected bundle and its report are in "
                f"'{rejected}'. Build another precision, or loosen a tolerance with --tolerance [OUTPUT:]METRIC=VALUE "
                "(outputs: logits, tokens) only if the difference is acceptable.")

    manifest.source["timings_s"] = timings
    return finish_bundle(staging / "bundle", output, manifest, report, title=f"Parity: {manifest.name}",
                         context={"source": str(spec), "target": f"ort ({options.device})",
                                  "precision": options.precision, "enginekit": __version__},
                         timings=timings, failure=failure)


def validate(options: Any, vlm: str | None = None) -> None:
    """Refuse what generation bundles cannot be built as (vlm: the model_type of a VLM source)."""
    weight_only = (Precision.INT8, Precision.INT4)
    if vlm and (options.precision not in (Precision.FP32, Precision.FP16, Precision.BF16, *weight_only)
                or options.target != "ort" or options.lowering == "native"):
        raise UsageError(
            f"Expected --target ort --precision fp32, fp16, bf16 (AutoCast lowering) or int8/int4 (weight-only) for a "
            f"VLM ({vlm}), found --target {options.target} --precision {options.precision} --lowering "
            f"{options.lowering}: VLM bundles are built and gated on ONNX Runtime only, and native lowering of the "
            "vision engine and decoder is not built in this version. Pick one of those precisions."
        )
    if vlm and options.precision in weight_only:
        from exporter.recipes.vlm_genai import use_vlm_decoder

        use_vlm_decoder(options, vlm)  # refuses what has no weight-only decoder, with the way out
    if options.target != "ort":
        raise UsageError(
            f"Expected --target ort for a causal LM, found --target {options.target}: generation bundles (prefill + "
            "decode engines with a KV cache) are built for ONNX Runtime only in this version."
        )
    if options.precision is Precision.FP8:
        raise UsageError("Expected --precision fp32, fp16, bf16, int8 or int4 (weight-only) for a causal LM, found fp8.")
    if options.precision in (Precision.INT8, Precision.INT4) and options.calib is not None:
        raise UsageError(
            f"Expected no --calib with --precision {options.precision} for a causal LM: it is weight-only (MatMulNBits, scales from "
            "the weights themselves), which needs no calibration data. Drop --calib."
        )
    if options.lowering not in ("autocast", "native"):
        raise UsageError(f"Expected --lowering autocast or native, found '{options.lowering}'.")
    if options.lowering == "native" and not options.precision.mixed:
        raise UsageError(f"Expected --lowering native with --precision fp16 or bf16, found --precision {options.precision}.")
    if options.precision in (Precision.INT8, Precision.INT4):
        options = replace(options, precision="fp32")  # the rest of validate() knows Q/DQ INT8 only
    options.validate()


def _build_into(spec: SourceSpec, source_text: str, options: Any, output: Path, staging: Path, say: Any,
                timings: dict[str, float]) -> tuple[Manifest, Any]:
    from exporter.gate.tokens import parity_prompts

    work, bundle = staging / "work", staging / "bundle"
    work.mkdir()
    bundle.mkdir()
    vlm = vlm_model_type(spec) is not None
    # The gate compares these outputs (exporter/gate/tokens.py, vision_language.py): checked before loading.
    check_tolerance_outputs(options.tolerances, ["logits", "tokens", *(VISION_OUTPUTS if vlm else ())])
    with timed(timings, "load", say, f"Loading {spec}"):
        model, tokenizer, processor, info, dims, vision = _load(spec, options, vlm)
    check_memory(_decode_io(model, dims, options, vlm), options.memory_limit, gate_cases=False)
    if vlm:
        one = _one_graph_vlm(spec, source_text, options, output, staging, say, timings, model, tokenizer, processor,
                             info, dims, vision)
        if one is not None:
            return one
    builder_note = None
    if use_genai(options, model, vlm, dims["total_sequence"].max if "total_sequence" in dims else None):
        from exporter.export.genai import BuilderFailed

        try:
            return build_genai_into(spec, source_text, options, output, staging, say, timings, model, tokenizer, info,
                                    dims)
        except BuilderFailed as exc:
            if options.generator != "auto" or options.precision is Precision.INT4:
                raise
            # e.g. GenAI 0.18's builder on a tiny Phi-3 at fp32: KeyError 'multi_cache'
            builder_note = f"ONNX Runtime GenAI's builder failed ({exc.cause[:200]}); built enginekit's own graphs"
            say("ONNX Runtime GenAI's builder failed: building enginekit's own graphs")
            for folder in (work, bundle):
                shutil.rmtree(folder)
                folder.mkdir()
    native = options.lowering == "native"
    with timed(timings, "export", say, "Exporting prefill and decode graphs (KV cache as inputs/outputs)"
                + (f" in {options.precision}" if native else "") + (" and the vision engine" if vlm else "")):
        exported = _export(model, options, work, dims, vision)
    if builder_note:
        exported.notes.append(builder_note)
    for part in exported.components.values():
        check_memory(part.io, options.memory_limit, graph=part.path)
    prompts = [] if vlm else parity_prompts(tokenizer, options.data, model.config, dims)
    feeds = _autocast_feeds(exported, options, vision, tokenizer, model, prompts)
    kept = mixed_options(options) if options.lowering != "native" else None  # op types the provider refused
    built, manifest = lower_and_build(
        lambda lowered, realised: _Built(spec, source_text, output, bundle, work, exported, lowered, realised, info, dims,
                                         vision), exported, options, work, feeds, kept, model, tokenizer, timings, say)
    return gate_or_unfuse(built, options, model, tokenizer, manifest, timings, say,
                          lambda opts: _gate_generation(built, opts, model, tokenizer, processor, prompts, timings, say))


def _one_graph_vlm(spec: SourceSpec, source_text: str, options: Any, output: Path, staging: Path, say: Any,
                   timings: dict[str, float], model: Any, tokenizer: Any, processor: Any, info: dict[str, Any],
                   dims: dict[str, DimRange], vision: Any) -> tuple[Manifest, Any] | None:
    """A Qwen2.5-VL / Qwen3-VL with the builder's one-graph decoder (recipes/vlm_genai.py), or None: not that case."""
    from exporter.recipes.vlm_genai import export_or_none, lower_one_graph, spec_fields, vision_precision

    work, bundle = staging / "work", staging / "bundle"
    exported = export_or_none(spec, options, staging, model, tokenizer, vision, dims, info, timings, say)
    if exported is None:
        return None
    vision_options = replace(options, precision=vision_precision(options))
    feeds = _autocast_feeds(exported, vision_options, vision, tokenizer, model, [])
    kept = mixed_options(vision_options) if vision_options.precision.mixed else None
    built, manifest = lower_and_build(
        lambda lowered, realised: _Built(spec, source_text, output, bundle, work, exported, lowered, realised, info, dims,
                                         vision, extra_spec=spec_fields()),
        exported, options, work, feeds, kept, model, tokenizer, timings, say,
        lower=lambda *args: lower_one_graph(*args, lower_all=_lower_all))
    return gate_or_unfuse(built, options, model, tokenizer, manifest, timings, say,
                          lambda opts: _gate_generation(built, opts, model, tokenizer, processor, [], timings, say))


def lower_and_build(make: Callable[[dict[str, Path], dict[str, Any]], _Built], exported: GenerationExport, options: Any,
                    work: Path, feeds: dict[str, Any] | None, kept: Any, model: Any, tokenizer: Any,
                    timings: dict[str, float], say: Any, lower: Callable[..., Any] | None = None) -> tuple[_Built, Manifest]:
    """Lower every graph, build the engines and the manifest; an op type the provider refuses in the low precision
    is kept in FP32 in every graph and the graphs lowered again. make(lowered, realised): the _Built. lower: the
    lowering (default _lower_all; a one-graph VLM lowers its vision engine alone)."""
    history: list[dict[str, Any]] = []
    while True:
        with timed(timings, "lower", say, f"Lowering precision to {options.precision}"):
            lowered, realised = (lower or _lower_all)(exported, options, work, feeds, kept)
        if history:
            realised["provider_refusals"] = list(history)
        built = make(lowered, realised)
        try:
            return built, _engines_and_manifest(built, options, model, tokenizer, timings, say)
        except BuildError as exc:
            # e.g. ORT 1.31's CUDA provider has no BF16 Reciprocal (Qwen3-VL's RMSNorm, measured on the H200):
            # keep that op type in FP32 in every graph and lower again (the plain recipe does the same)
            if not (kept and keep_unrunnable_op(exc, kept, history, say)):
                raise
            shutil.rmtree(built.bundle)
            built.bundle.mkdir()


def gate_or_unfuse(built: _Built, options: Any, model: Any, tokenizer: Any, manifest: Manifest,
                   timings: dict[str, float], say: Any, gate: Callable[[Any], Any]) -> tuple[Manifest, Any]:
    """gate(options): the token gate's report; a failure on fused engines builds them again unfused and gates again
    (a fusion must never make a graph worse)."""
    report = gate(options)
    why = unfuse_reason(report, [c.get("fusions") or {} for c in manifest.target.options["generation"].values()],
                        options.ort_fusions)
    if why is not None:
        say("The token gate failed with ORT's fusions: building the engines again without them")
        options = replace(options, ort_fusions=False)
        shutil.rmtree(built.bundle)
        built.bundle.mkdir()
        manifest = _engines_and_manifest(built, options, model, tokenizer, timings, say, unfused_because=why)
        report = gate(options)
    return manifest, report


@dataclass
class _Built:
    """What the export and lowering stages handed the engine stage of a generation build."""

    spec: SourceSpec
    source_text: str
    output: Path
    bundle: Path
    work: Path
    exported: GenerationExport
    lowered: dict[str, Path]
    realised: dict[str, Any]
    info: dict[str, Any]
    dims: dict[str, DimRange]
    vision: Any
    extra_spec: dict[str, Any] | None = None  # more generation.json fields (an encoder-decoder's, recipes/seq2seq.py)
    extra_files: dict[str, bytes] | None = None  # more bundle files, listed in the manifest (Whisper's mel filters)


def _engines_and_manifest(b: _Built, options: Any, model: Any, tokenizer: Any, timings: dict[str, float], say: Any,
                          unfused_because: str | None = None) -> Manifest:
    components: dict[str, Any] = {}
    engine_files: list[str] = []
    target = None
    with timed(timings, "build", say, f"Building the ort engines ({options.device})"):
        for name in b.exported.components:
            if b.exported.builder is not None and name == "decoder":  # written by GenAI's builder, already fused
                from exporter.recipes.vlm_genai import place_decoder

                files, fusions = place_decoder(b.exported, b.bundle)
                components[name] = {"file": files[0], "io": b.exported.components[name].io.to_dict(), "fusions": fusions}
                engine_files += files
                continue
            target, files, io = _build_component(name, b.lowered[name], b.exported, options, b.bundle, b.work)
            fusions = target.options.get("fusions") or {}
            if unfused_because:
                fusions = {**fusions, "fallback": unfused_because}
            components[name] = {"file": files[0], "io": io.to_dict(), "fusions": fusions}
            engine_files += files
    assert target is not None
    more: dict[str, Any] = dict(b.extra_spec or {})
    if b.vision is not None:
        from exporter.export.vlm import write_embeddings

        more = {**more, "model_type": b.info["model_type"], "vision": {**b.vision.to_dict(), "file": components["vision"]["file"]},
                "embeddings": {"file": write_embeddings(model, b.bundle), "dtype": "float32"}}
    main = "decode" if "decode" in components else "decoder"  # the component of decode steps (a one-graph VLM's)
    extra = _write_side_files(b.bundle, model, tokenizer, b.exported, components, more, main)
    for name, data in (b.extra_files or {}).items():
        (b.bundle / name).write_bytes(data)
        extra.append(name)
    target = replace(target, engine_files=engine_files, options={**target.options, "generation": {
        n: {"file": c["file"], "fusions": c["fusions"]} for n, c in components.items()},
        **({"architecture": more["architecture"]} if "architecture" in more else {})})
    if b.exported.builder is not None:
        target.versions["onnxruntime-genai"] = version_of("onnxruntime_genai")
    manifest = Manifest(
        name=b.output.name,
        source={"spec": str(b.spec), "kind": b.spec.kind, "exporter": b.exported.exporter, "opset": b.exported.opset,
                "onnx_sha256": file_sha256(b.exported.components[main].path), "notes": b.exported.notes, **b.info},
        io=IOSpec.from_dict(components[main]["io"]),
        precision={"requested": options.precision, "realised": b.realised},
        target=target,
        build_command=build_command(b.source_text, options, b.output,
                                    {k: v for k, v in b.dims.items() if k != "past_sequence"}),
        enginekit_version=__version__,
    )
    manifest.files = {f: file_sha256(b.bundle / f) for f in engine_files + extra}
    manifest.write(b.bundle)
    return manifest


def _gate_generation(b: _Built, options: Any, model: Any, tokenizer: Any, processor: Any, prompts: list[Any],
                     timings: dict[str, float], say: Any) -> Any:
    from exporter.gate.tokens import token_gate

    with timed(timings, "gate", say, "Token parity: engines vs transformers generate() (FP32)"):
        if b.vision is not None:
            from exporter.gate.vision_language import vlm_gate

            return vlm_gate(model, tokenizer, processor, b.bundle, options, say)
        return token_gate(model, tokenizer, b.bundle, prompts, options, b.lowered, say)


def _load(spec: SourceSpec, options: Any, vlm: bool) -> tuple[Any, Any, Any, dict[str, Any], dict[str, DimRange], Any]:
    """(model, tokenizer, processor, info, dims, vision spec); processor and vision are None for a causal LM."""
    if not vlm:
        model, tokenizer, info = load_causal_lm(spec)
        return model, tokenizer, None, info, default_dims(model.config, options.shapes), None
    from exporter.export.vlm import load_vlm, split_vision_shapes, vision_spec

    model, tokenizer, processor, info = load_vlm(spec)
    text_shapes, vision_shapes = split_vision_shapes(options.shapes)
    dims = default_dims(model.config, text_shapes)
    vision = vision_spec(model, tokenizer, processor, vision_shapes)
    info["image_size"] = list(vision.image_size)  # fixed per bundle; the runtime refuses others
    return model, tokenizer, processor, info, dims, vision


def _decode_io(model: Any, dims: dict[str, DimRange], options: Any, vlm: bool) -> IOSpec:
    """The decode graph's IOSpec before export (its KV cache dominates the inputs at the max shape), in
    the dtype the cache will have: FP16/BF16 for --lowering native, else FP32."""
    cache = cache_layout(model.config)
    if options.lowering == "native" and options.precision.mixed:
        cache.dtype = {"fp16": "float16", "bf16": "bfloat16"}[options.precision]
    vocab = int(model.get_output_embeddings().weight.shape[0])
    embeds = int(model.get_input_embeddings().weight.shape[1]) if vlm else None
    return component_io("decode", cache, vocab, dims, embeds=embeds, mrope=vlm)


def _export(model: Any, options: Any, work: Path, dims: dict[str, DimRange], vision: Any) -> GenerationExport:
    native, vlm = options.lowering == "native", vision is not None
    exported = export_generation(_in_dtype(model, options.precision) if native else model, work, dims,
                                 exporter=options.exporter, opset=options.opset, vlm=vlm,
                                 deepstack=vision.deepstack if vlm else 0)
    if vlm:
        from exporter.export.generation import GraphExport
        from exporter.export.vlm import DEFAULT_IMAGES, export_vision

        images = options.shapes.get("images") or DEFAULT_IMAGES
        vision_io = export_vision(model, vision, work / "vision.onnx", images, opset=options.opset)
        exported.components["vision"] = GraphExport(work / "vision.onnx", vision_io)
    return exported


def _autocast_feeds(exported: GenerationExport, options: Any, vision: Any, tokenizer: Any, model: Any,
                    prompts: list[list[int]]) -> dict[str, Any] | None:
    """AutoCast's range data per graph, computed once per build (a lowering round after a provider refusal reuses
    it): a causal LM's from its prompts (exporter/gate/tokens.py), a VLM's from photos and prompts
    (exporter/gate/vision_language.py); None when nothing is lowered by AutoCast."""
    if options.precision not in (Precision.FP16, Precision.BF16) or options.lowering == "native":
        return None
    paths = {n: c.path for n, c in exported.components.items()}
    if vision is None:
        from exporter.gate.tokens import calibration_feeds

        return calibration_feeds(paths, prompts)
    from exporter.gate.vision_language import calibration_feeds_vlm

    table = model.get_input_embeddings().weight.detach().float().cpu().numpy()
    return calibration_feeds_vlm(paths, vision, tokenizer, table)


def _lower_all(exported: GenerationExport, options: Any, work: Path, feeds: dict[str, Any] | None = None,
               kept: Any = None) -> tuple[dict[str, Path], dict[str, Any]]:
    """Each graph lowered on its own (fp16/bf16: AutoCast with the range data `feeds`, _autocast_feeds; int8:
    weight-only MatMulNBits); returns the lowered paths and the realised precision per graph.
    kept: MixedOptions whose fp32_ops (op types the provider refused in the low precision) every graph keeps."""
    paths = {n: c.path for n, c in exported.components.items()}
    if not options.precision.reduced:
        return paths, {"requested": "fp32"}
    if options.lowering == "native":
        return paths, {"requested": options.precision, "lowering": f"native: exported from torch in {options.precision} "
                       "(weights, activations and KV cache; the model's own FP32 upcasts in norms and softmax kept)",
                       "kv_cache_dtype": exported.cache.dtype}
    if options.precision is Precision.INT8:
        from exporter.lower.weight_only import quantize_weights

        out = {}
        realised: dict[str, Any] = {"requested": "int8"}
        for name, path in paths.items():
            out[name] = work / f"{name}.int8.onnx"
            realised[name] = quantize_weights(path, out[name], device=options.device)
        return out, realised
    from exporter.lower.precision import lower_precision

    out, realised = {}, {"requested": options.precision}
    for name, path in paths.items():
        sub = work / f"lower-{name}"
        sub.mkdir(exist_ok=True)
        safe = path.with_name(f"{name}.maskfill.onnx")
        clamped = clamp_mask_fill(path, safe)
        mixed = mixed_options(options)
        if kept is not None:
            mixed.fp32_ops, mixed.op_reasons = list(kept.fp32_ops), dict(kept.op_reasons)
        lowered = lower_precision(safe, options.precision, sub, mixed=mixed, calibration=feeds[name])
        _drop_shapes(lowered.path)
        out[name] = lowered.path
        realised[name] = {**lowered.realised, "mask_fill_constants_clamped": clamped}
    return out, realised


def _drop_shapes(path: Path) -> None:
    """Remove the intermediate shapes AutoCast's shape inference wrote: it names different sizes
    by one symbol (unk__18 for 4 query heads and for 2 key-value heads), and ONNX Runtime, planning
    buffers by those names, then fails ("Shape mismatch attempting to re-use buffer"). ORT infers
    them itself."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    del model.graph.value_info[:]
    onnx.save(model, str(path))


def clamp_mask_fill(path: Path, out: Path) -> int:
    """Copy of the graph whose mask fill constants (±FLT_MAX, transformers' finfo(float32).min)
    become ±65504. Cast to FP16 or BF16 they would be -inf, and the masked softmax computes
    0 * -inf = NaN (every decode step of a Qwen2 came out NaN); -65504 still sends exp() to 0.
    Only small constants exactly at ±FLT_MAX change; the weights are not read."""
    import onnx
    from onnx import numpy_helper

    big = float(np.finfo(np.float32).max)
    model = onnx.load(str(path), load_external_data=False)
    count = 0
    tensors = [init for init in model.graph.initializer]
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    for t in tensors:
        if t.data_type != onnx.TensorProto.FLOAT or t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        arr = numpy_helper.to_array(t)
        if 0 < arr.size <= 16 and np.all(np.abs(arr) == big):
            t.CopyFrom(numpy_helper.from_array(np.sign(arr).astype(np.float32) * np.float32(65504.0), t.name))
            count += 1
    onnx.save(model, str(out))  # beside the original: the same external data file, if any
    return count


def _in_dtype(model: Any, precision: str) -> Any:
    """A copy of `model` in FP16/BF16 (the FP32 one stays the parity reference)."""
    import copy

    import torch

    return copy.deepcopy(model).to({"fp16": torch.float16, "bf16": torch.bfloat16}[precision])


def _build_component(name: str, path: Path, exported: GenerationExport, options: Any, bundle: Path,
                     work: Path) -> tuple[Any, list[str], Any]:
    import onnx

    from exporter.export.onnxutil import io_from_onnx

    folder = bundle / name
    folder.mkdir()
    # The same ORT build (with fuse_for_ort's fusions) as single-graph bundles, one folder per graph.
    target = build_engine(path, folder, options, exported.components[name].io, folder, lambda _m: None,
                           low_precision=options.precision.reduced, work=work)
    # The engine's own dtypes (native FP16 I/O, an FP16 cache) over the canonical FP32 ones.
    ins, outs, _, _ = io_from_onnx(onnx.load(str(path), load_external_data=False))
    dt = {t.name: t.dtype for t in ins + outs}
    io = exported.components[name].io
    io = replace(io, inputs=[replace(t, dtype=dt.get(t.name, t.dtype)) for t in io.inputs],
                 outputs=[replace(t, dtype=dt.get(t.name, t.dtype)) for t in io.outputs])
    return target, [f"{name}/{f}" for f in target.engine_files], io


def _write_side_files(bundle: Path, model: Any, tokenizer: Any, exported: GenerationExport,
                      components: dict[str, Any], more: dict[str, Any] | None = None, decode: str = "decode") -> list[str]:
    """tokenizer.json (when the source has one) and generation.json (+ `more`: a VLM's vision spec
    and embedding table, whose file is listed too); returns their names. decode: the component of decode steps."""
    files = []
    tok_name = None
    backend = getattr(tokenizer, "backend_tokenizer", None) if tokenizer is not None else None
    if backend is not None:
        backend.save(str(bundle / TOKENIZER_FILE))
        tok_name = TOKENIZER_FILE
        files.append(TOKENIZER_FILE)
    spec = {
        "schema_version": 1,
        "components": components,
        "cache": {"layers": exported.cache.layers, "kv_heads": exported.cache.kv_heads,
                  "head_dim": exported.cache.head_dim,
                  "dtype": next(s["dtype"] for s in components[decode]["io"]["outputs"]
                                if s["name"].startswith("present."))},
        # GroupQueryAttention rotates at cache indices (runtimes/decoding.py says why); a VLM's M-RoPE: runtimes/vlm.py
        "positions": "mrope" if more and "vision" in more else "absolute" if any("GroupQueryAttention" in (
            (c.get("fusions") or {}).get("fused_ops") or {}) for c in components.values()) else "compact",
        "tokenizer": tok_name,
        **generation_metadata(model, tokenizer),
        **(more or {}),
    }
    (bundle / GENERATION_FILE).write_text(json.dumps(spec, indent=2, default=str) + "\n", encoding="utf-8")
    files.append(GENERATION_FILE)
    if more and "embeddings" in more:
        files.append(more["embeddings"]["file"])
    return files
