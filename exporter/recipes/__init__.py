"""The recipe table: which recipe builds a source, decided once from its spec and its config.json
(read once, as JSON: nothing is imported to decide). A recipe declares its parts (the graphs it
builds), how each is exported, its gate and the runtime that loads its bundle; its `build` runs the
stages (exporter/loading, export, precision, engine, gate, bundle) and returns the one BuildResult
that exporter/bundle/assemble.py assembles. Recipes import stages, never the reverse; adding a family is a row
here, its build function and its tests.

    enginekit build SOURCE  →  parse_source → read_config → select_recipe → recipe.validate → recipe.build
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.bundle.assemble import BuildResult, check_output, keep_named_files, staging_for
from exporter.export.vlm import UNSUPPORTED_VLM, VLM_MODEL_TYPES
from exporter.options import BuildOptions, default_output, shown_path
from exporter.recipes import generation, plain, seq2seq, zeroshot
from exporter.source.causal import CAUSAL_SUFFIXES, gguf_file
from exporter.source.spec import SourceSpec, parse_source
from exporter.source.towers import DUAL_ENCODERS
from exporter.timing import Progress, no_progress
from runtimes.errors import EnginekitError

Config = dict[str, Any]  # the source's config.json as JSON ({} when it has none)


@dataclass(frozen=True)
class Recipe:
    name: str
    parts: tuple[str, ...]  # the graphs (engines) a bundle of this recipe holds
    export: str  # how each part is exported
    gate: str  # what the gate compares
    runtime: str  # what loads the bundle
    matches: Callable[[SourceSpec, Config], bool]
    validate: Callable[[BuildOptions, SourceSpec, Config], None]
    build: Callable[[SourceSpec, str, BuildOptions, Path, Path, Progress], BuildResult]


def read_config(spec: SourceSpec) -> Config:
    """An hf: folder's config.json as JSON; {} for other sources, a missing file or an unreadable one
    (the loader then says what is wrong with the folder)."""
    if spec.kind != "hf":
        return {}
    path = Path(spec.location) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_vlm(spec: SourceSpec, config: Config) -> bool:
    return spec.kind == "hf" and spec.task in (None, "text-generation") and \
        config.get("model_type") in (*VLM_MODEL_TYPES, *UNSUPPORTED_VLM)


def _is_generation(spec: SourceSpec, config: Config) -> bool:
    if spec.kind != "hf":
        return False
    if gguf_file(spec) is not None:
        return True
    if spec.task not in (None, "text-generation") or not config:
        return False
    archs = config.get("architectures") or []
    return spec.task == "text-generation" or any(str(a).endswith(CAUSAL_SUFFIXES) for a in archs)


def _is_zero_shot(spec: SourceSpec, config: Config) -> bool:
    return spec.kind == "hf" and spec.task in (None, "zero-shot-image-classification") and \
        config.get("model_type") in DUAL_ENCODERS


# Encoder-decoders that take audio or images (their encoder inputs are not token ids): no recipe yet, but Whisper.
_NOT_TEXT_SEQ2SEQ = ("speech_to_text", "speech-encoder-decoder", "vision-encoder-decoder", "speecht5",
                     "seamless_m4t", "seamless_m4t_v2", "pop2piano", "moonshine", "musicgen", "musicgen_melody",
                     "pix2struct", "kosmos-2", "florence2")
_NOT_TEXT_KEYS = ("num_mel_bins", "vision_config", "audio_config", "input_feat_per_channel", "encoder")


def _is_seq2seq(spec: SourceSpec, config: Config) -> bool:
    """A text encoder-decoder LM (T5, BART, Marian, mBART, Pegasus, …: is_encoder_decoder in its config, token ids
    into its encoder), Whisper (log-mel features into its encoder) or BLIP's captioning model (pixels into its vision
    tower, a text decoder cross-attending to it)."""
    if spec.kind != "hf":
        return False
    if config.get("model_type") == "whisper":
        return spec.task in (None, "automatic-speech-recognition")
    if config.get("model_type") == "blip":  # its captioning head; BLIP's retrieval and VQA heads are other tasks
        return spec.task in (None, "image-to-text") and \
            "BlipForConditionalGeneration" in (config.get("architectures") or [])
    return spec.task in (None, "text2text-generation", "translation", "summarization") and \
        bool(config.get("is_encoder_decoder")) and config.get("model_type") not in _NOT_TEXT_SEQ2SEQ and \
        not any(k in config for k in _NOT_TEXT_KEYS)


def _validate_seq2seq(options: BuildOptions, _spec: SourceSpec, _config: Config) -> None:
    seq2seq.validate(options)


def _validate_generation(options: BuildOptions, spec: SourceSpec, config: Config) -> None:
    generation.validate(options, config.get("model_type") if _is_vlm(spec, config) else None)


def _validate(options: BuildOptions, _spec: SourceSpec, _config: Config) -> None:
    from runtimes.choices import Precision
    from runtimes.errors import UsageError

    if options.precision is Precision.INT4:
        raise UsageError("Expected --precision fp32, fp16, bf16, int8 or fp8 for this model, found int4: INT4 is "
                         "weight-only, for causal LMs on ONNX Runtime GenAI. Use int8 (Q/DQ from --calib) here.")
    options.validate()


RECIPES: tuple[Recipe, ...] = (
    Recipe("vision-language", ("vision", "prefill", "decode"),
           "vision tower at a fixed image size (transformers' OnnxExporter); decoder graphs on inputs_embeds with "
           "M-RoPE (generic KV-cache wrapper)",
           "vision embeddings and greedy tokens vs transformers FP32 on photos", "runtimes.vlm.load_vlm_generator",
           _is_vlm, _validate_generation, generation.build_generation),
    Recipe("generation", ("prefill", "decode"),
           "prefill and decode graphs with the KV cache as inputs/outputs (transformers' decomposition, else a "
           "generic wrapper)", "greedy tokens and teacher-forced logits vs transformers generate()",
           "runtimes.generate.load_generator", _is_generation, _validate_generation, generation.build_generation),
    Recipe("seq2seq", ("prefill", "decode"),
           "prefill (encoder, cross-attention keys/values, first decoder step) and decode graphs with the self- and "
           "cross-attention caches as inputs/outputs (an EncoderDecoderCache wrapper)",
           "greedy tokens and teacher-forced logits vs transformers generate()",
           "runtimes.generate.load_generator (runtimes.seq2seq)", _is_seq2seq, _validate_seq2seq, seq2seq.build_seq2seq),
    Recipe("zero-shot", ("image", "text"), "each CLIP tower with its projection head, as a plain recipe",
           "each tower's own gate, then logits, embeddings and zero-shot ranking vs CLIPModel",
           "runtimes.zeroshot (runtimes.load)", _is_zero_shot, _validate, zeroshot.build_dual_encoder),
    Recipe("plain", ("model",), "torch.export → torch.onnx (dynamo), else transformers' OnnxExporter",
           "per-output metrics vs torch FP32 (detection-aware matching for detectors, vs the FP32 ONNX for onnx:)",
           "runtimes.load", lambda _spec, _config: True, _validate, plain.build_plain),
)


# Families with no recipe yet: speech- and image-to-text encoder-decoders (Speech2Text, VisionEncoderDecoder; Whisper
# and BLIP's captioning model have one) and other captioning models. Refused before anything is loaded.
SEQ2SEQ_HINT = ("optimum-cli export onnx (encoder + decoder-with-past graphs) builds such models today; for an "
                "encoder's embeddings alone, export its encoder as its own model (save_pretrained of "
                "model.get_encoder())")


def refuse_unbuilt_family(spec: SourceSpec, config: Config) -> None:
    """A UsageError (exit 2) for an hf: model of a family no recipe builds, instead of a failure deep in the
    reference call (T5 and Whisper ended in an internal error, BART in torch.export)."""
    from runtimes.errors import UsageError

    if spec.kind != "hf" or not config:
        return
    model_type = config.get("model_type")
    archs = [str(a) for a in config.get("architectures") or []]
    if _is_seq2seq(spec, config):
        return
    if config.get("is_encoder_decoder") or model_type in ("vision-encoder-decoder", "speech-encoder-decoder"):
        kind = "a speech- or image-to-text encoder-decoder model"
    elif model_type in ("blip", "blip-2", "git", "pix2struct", "kosmos-2", "instructblip"):
        kind = "an image-to-text (captioning) model"
    else:
        return
    raise UsageError(
        f"Expected a model of a family enginekit builds (text and audio encoders, decoder LMs, vision models, "
        f"CLIP-like dual encoders, Qwen2-VL, text encoder-decoders), found {kind} ('{model_type}', {', '.join(archs) or 'no architectures'}): "
        f"this version has no recipe for it, so nothing was built. {SEQ2SEQ_HINT}."
    )


def select_recipe(spec: SourceSpec, config: Config) -> Recipe:
    """The first recipe in RECIPES that matches (the plain one matches everything)."""
    return next(r for r in RECIPES if r.matches(spec, config))


def build(source_text: str, options: BuildOptions, progress: Progress | None = None) -> BuildResult:
    """`enginekit build`: build, gate and publish a bundle; raises an EnginekitError subclass on user
    errors. The bundle is assembled in a hidden sibling folder of the output and renamed into place
    only after the gate passed; a bundle that failed it is kept at `<output>.rejected`."""
    say = progress or no_progress
    spec = parse_source(source_text)
    config = read_config(spec)
    refuse_unbuilt_family(spec, config)
    recipe = select_recipe(spec, config)
    recipe.validate(options, spec, config)
    output = Path(options.output) if options.output else default_output(source_text, options)
    _note_handoff(options, output, say)
    return build_at(recipe, spec, source_text, options, output, say)


def build_at(recipe: Recipe, spec: SourceSpec, source_text: str, options: BuildOptions, output: Path,
             say: Progress) -> BuildResult:
    """Run `recipe` into a staging folder beside `output` (refused if it exists, unless --force). An
    error that names a file of the staging folder (the graph ONNX Runtime refused) gets that file
    kept at `<output>.rejected/`, and names it there: the staging folder is gone when it is read."""
    check_output(output, options.force)
    with staging_for(output) as staging:
        try:
            return recipe.build(spec, source_text, options, output, staging, say)
        except EnginekitError as exc:
            moved = keep_named_files(exc, staging, output)
            if moved is None:
                raise
            raise moved from None


def _note_handoff(options: BuildOptions, output: Path, say: Progress) -> None:
    """Say at the start, not after a long export, that a TensorRT build stops after lowering here
    (exporter/build/handoff.py keeps the lowered ONNX for a machine with TensorRT)."""
    if options.target != "trt":
        return
    from exporter.build.handoff import kept_folder
    from runtimes.trt.build import tensorrt_unavailable

    reason = tensorrt_unavailable()
    if reason is not None:
        say(f"Note: TensorRT cannot build here, {reason}: this build stops after lowering and keeps the lowered "
            f"ONNX in '{shown_path(kept_folder(output))}/', with the command that finishes it on a TensorRT machine")
