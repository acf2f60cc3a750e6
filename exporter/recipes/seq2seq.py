"""`enginekit build` for encoder-decoder text models (T5, BART, Marian, mBART, Pegasus, …ForConditionalGeneration):
a seq2seq generation bundle gated on tokens against transformers' own generate().

    source ─▶ prefill.onnx (encoder + cross-attention keys/values + first decoder step), decode.onnx
           ─▶ lowered (fp16/bf16: AutoCast; int8: weight-only) ─▶ ORT fusions ─▶ engines ─▶ token parity ─▶ bundle

The graphs are exporter/export/seq2seq.py's; lowering, engines, side files and the token gate are the causal
LM's (exporter/recipes/generation.py, exporter/gate/tokens.py), run on the seq2seq loop
(runtimes/seq2seq.py). Speech-to-text (Whisper) and image-to-text models are not built by this recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from exporter.bundle.assemble import BuildResult
from exporter.export.memory import check_memory
from exporter.export.seq2seq import (
    audio_input,
    captioning,
    component_io,
    decoder_start,
    export_seq2seq,
    seq2seq_layout,
    vocab_of,
)
from exporter.gate.task import check_tolerance_outputs
from exporter.lower.mixed import mixed_options
from exporter.recipes.generation import _Built, gate_or_unfuse, lower_and_build, publish_generation
from exporter.recipes.generation import validate as validate_generation
from exporter.source.spec import SourceSpec
from exporter.timing import Progress, timed
from runtimes.choices import Precision
from runtimes.errors import SourceError, UsageError
from runtimes.manifest import DimRange
from runtimes.seq2seq import SEQ2SEQ


def validate(options: Any) -> None:
    if options.target != "ort":
        raise UsageError(f"Expected --target ort for an encoder-decoder model, found --target {options.target}: seq2seq "
                         "bundles (prefill + decode engines with self- and cross-attention caches) are built for ONNX "
                         "Runtime only in this version.")
    if options.precision in (Precision.FP8, Precision.INT4):
        raise UsageError(f"Expected --precision fp32, fp16, bf16 or int8 (weight-only) for an encoder-decoder model, "
                         f"found {options.precision}.")
    if options.precision is Precision.INT8 and options.calib is not None:
        raise UsageError("Expected no --calib with --precision int8 for an encoder-decoder model: it is weight-only "
                         "(MatMulNBits, scales from the weights), which needs no calibration data. Drop --calib.")
    if options.lowering != "autocast":
        raise UsageError(f"Expected --lowering autocast for an encoder-decoder model, found '{options.lowering}': native "
                         "FP16/BF16 export is built for causal LMs only in this version.")
    validate_generation(options)


def default_dims(config: Any, shapes: dict[str, DimRange]) -> dict[str, DimRange]:
    """batch 1:1:16 (beams count as rows); source (sequence) 1:64:512 and decoder length (total_sequence)
    2:64:256, each capped by the model's learned positions where it has them (T5's are relative; Whisper's
    decoder has max_target_positions, its encoder a fixed 30 s)."""
    text = getattr(config, "text_config", None) if getattr(config, "model_type", None) == "blip" else None
    config = text or config
    positions = getattr(config, "max_target_positions", None) or getattr(config, "max_position_embeddings", None)
    cap = int(positions) if positions else 1 << 16
    unknown = sorted(set(shapes) - {"batch", "sequence", "total_sequence"})
    if unknown:
        raise UsageError(f"Expected --shapes for an encoder-decoder model to name batch, sequence (the source) and "
                         f"total_sequence (the decoder's tokens), found {sorted(shapes)}. Example: --shapes "
                         "batch=1:1:8,sequence=1:64:512,total_sequence=2:64:256.")
    source = shapes.get("sequence") or DimRange(1, min(64, cap), min(512, cap))
    total = shapes.get("total_sequence") or DimRange(2, min(64, cap), min(256, cap))
    if total.max < 2 or source.max > cap or total.max > cap:
        raise UsageError(f"Expected sequence and total_sequence of at most {cap} (the model's positions) and "
                         f"total_sequence of at least 2, found sequence={source}, total_sequence={total}.")
    return {"batch": shapes.get("batch") or DimRange(1, 1, 16), "sequence": source, "prefix": DimRange(1, 1, 4),
            "past_sequence": DimRange(1, max(1, total.opt - 1), total.max - 1), "total_sequence": total}


def load_seq2seq(spec: SourceSpec) -> tuple[Any, Any, dict[str, Any]]:
    """(model in FP32, tokenizer or None, info for the manifest) of an hf: encoder-decoder folder (a speech one,
    Whisper, through AutoModelForSpeechSeq2Seq)."""
    import torch
    import transformers

    folder = Path(spec.location)
    auto = {"whisper": "AutoModelForSpeechSeq2Seq", "blip": "BlipForConditionalGeneration"}.get(
        _config_type(folder) or "", "AutoModelForSeq2SeqLM")
    try:
        model = getattr(transformers, auto).from_pretrained(str(folder), dtype=torch.float32).eval()
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise SourceError(f"Expected transformers' {auto} to load '{folder}', but it failed: "
                          f"{str(exc).strip().splitlines()[0][:300]}. Check the folder's config and weights.") from None
    tokenizer = None
    if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "spiece.model")):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError, KeyError, ImportError):
            tokenizer = None
    task = "automatic-speech-recognition" if audio_input(model) else "image-to-text" if captioning(model) \
        else "text2text-generation"
    info = {"task": task, "family": "seq2seq",
            "model_type": model.config.model_type, "class": type(model).__name__}
    return model, tokenizer, info


def _config_type(folder: Path) -> str | None:
    import json

    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def seq2seq_metadata(model: Any) -> dict[str, Any]:
    """generation.json's seq2seq fields: the decoder's start token, a forced first token (mBART-50's target
    language), tokens generate() never picks (Marian's pad), and the beam defaults of the generation config."""
    g = model.generation_config
    start = decoder_start(model)
    if start is None:
        raise SourceError("Expected the encoder-decoder model's config to name decoder_start_token_id, found none: "
                          "the decoder has no first token. Set it in config.json or generation_config.json.")
    vocab = vocab_of(model)
    bad = [w[0] for w in (g.bad_words_ids or []) if len(w) == 1]
    # ids past the vocabulary (WhisperConfig's default begin_suppress_tokens on a smaller vocabulary) name no token
    suppress = sorted({int(t) for t in [*bad, *(g.suppress_tokens or [])] if int(t) < vocab})
    begin = [int(t) for t in getattr(g, "begin_suppress_tokens", None) or [] if int(t) < vocab]
    # BLIP's text decoder ends captions at [SEP] and pads with its text config's pad (what its generate() passes)
    text = model.config.text_config if captioning(model) else None
    ends = {"eos_token_ids": [int(text.sep_token_id)], "pad_token_id": int(text.pad_token_id or 0)} if text else {}
    return {"architecture": SEQ2SEQ, "decoder_start_ids": _decoder_prefix(g, int(start)), **ends,
            "forced_bos_token_id": g.forced_bos_token_id, "forced_eos_token_id": _forced_eos(g), "suppress_token_ids": suppress,
            "begin_suppress_token_ids": begin,
            # transformers 5 leaves unset fields None; its generate() then uses 1.0 and False
            "beam": {"num_beams": int(g.num_beams or 1),
                     "length_penalty": float(1.0 if g.length_penalty is None else g.length_penalty),
                     "early_stopping": False if g.early_stopping is None else g.early_stopping}}


def _decoder_prefix(g: Any, start: int) -> list[int]:
    """The decoder's first tokens: the start token, then Whisper's forced ones (its generation config's
    forced_decoder_ids, or English + transcribe from lang_to_id / task_to_id) and <|notimestamps|>. This version
    transcribes English without timestamps; Whisper's language detection, translation task, timestamps and
    long-form (> 30 s) decoding are not built."""
    prefix = [start]
    forced = getattr(g, "forced_decoder_ids", None)
    if forced:
        prefix += [int(t) for _pos, t in sorted(forced) if t is not None]
    elif getattr(g, "lang_to_id", None) and getattr(g, "is_multilingual", False):
        prefix += [int(g.lang_to_id["<|en|>"]), int(g.task_to_id["transcribe"])]
    no_timestamps = getattr(g, "no_timestamps_token_id", None)
    if no_timestamps is not None and int(no_timestamps) not in prefix:
        prefix.append(int(no_timestamps))
    return prefix


def _forced_eos(g: Any) -> int | None:
    forced = g.forced_eos_token_id
    if isinstance(forced, (list, tuple)):
        return int(forced[0]) if len(forced) == 1 else None  # several: transformers allows any of them; not built
    return None if forced is None else int(forced)


def build_seq2seq(spec: SourceSpec, source_text: str, options: Any, output: Path, staging: Path,
                  say: Progress) -> BuildResult:
    timings: dict[str, float] = {}
    manifest, report = _build_into(spec, source_text, options, output, staging, say, timings)
    return publish_generation(spec, options, output, staging, manifest, report, timings, "seq2seq")


def _build_into(spec: SourceSpec, source_text: str, options: Any, output: Path, staging: Path, say: Any,
                timings: dict[str, float]) -> tuple[Any, Any]:
    from exporter.gate.tokens import parity_prompts, token_gate

    work, bundle = staging / "work", staging / "bundle"
    work.mkdir()
    bundle.mkdir()
    check_tolerance_outputs(options.tolerances, ["logits", "tokens"])
    with timed(timings, "load", say, f"Loading {spec}"):
        model, tokenizer, info = load_seq2seq(spec)
        dims = default_dims(model.config, options.shapes)
        extra = seq2seq_metadata(model)
    vocab = vocab_of(model)
    check_memory(component_io("decode", seq2seq_layout(model), vocab, dims), options.memory_limit, gate_cases=False)
    with timed(timings, "export", say, "Exporting prefill (encoder + cross-attention) and decode graphs"):
        exported = export_seq2seq(model, work, dims, opset=options.opset)
    for part in exported.components.values():
        check_memory(part.io, options.memory_limit, graph=part.path)
    files: dict[str, bytes] = {}
    if exported.cache.audio:
        from exporter.recipes.seq2seq_inputs import feature_spec, speech_prompts

        extractor, extra["features"], files = feature_spec(Path(spec.location), exported.cache)
        prompts: list[Any] = speech_prompts(extractor, options.data, exported.cache)
    elif exported.cache.image is not None:
        from exporter.recipes.seq2seq_inputs import caption_prompts, image_spec

        image_processor, extra["image"] = image_spec(Path(spec.location), exported.cache)
        prompts = caption_prompts(image_processor, options.data, extra["image"])
    else:
        prompts = parity_prompts(tokenizer, options.data, model.config, dims)
    feeds = calibration_feeds({n: c.path for n, c in exported.components.items()}, prompts, extra["decoder_start_ids"]) \
        if options.precision in (Precision.FP16, Precision.BF16) else None
    kept = mixed_options(options)
    built, manifest = lower_and_build(
        lambda lowered, realised: _Built(spec, source_text, output, bundle, work, exported, lowered, realised, info, dims,
                                         None, extra_spec=extra, extra_files=files), exported, options, work, feeds,
        kept, model, tokenizer, timings, say)
    prefix = extra["decoder_start_ids"]
    reference = {"decoder_start_token_id": prefix[0], "forced_bos_token_id": extra["forced_bos_token_id"],
                 "forced_eos_token_id": extra["forced_eos_token_id"], "suppress_tokens": extra["suppress_token_ids"] or None,
                 "begin_suppress_tokens": extra["begin_suppress_token_ids"] or None}

    def gate(opts: Any) -> Any:
        with timed(timings, "gate", say, "Token parity: engines vs transformers generate() (FP32)"):
            return token_gate(model, tokenizer, bundle, prompts, opts, built.lowered, say, reference_config=reference,
                              reference_prefix=prefix if len(prefix) > 1 or exported.cache.fixed_source else None)

    return gate_or_unfuse(built, options, model, tokenizer, manifest, timings, say, gate)


def calibration_feeds(paths: dict[str, Path], prompts: list[Any], start: list[int]) -> dict[str, list[dict[str, np.ndarray]]]:
    """Range data for AutoCast, per graph: the sources (token ids, or a speech model's features) for the prefill;
    for the decode, the prefill's next token with its caches (the FP32 prefill run by ONNX Runtime)."""
    from runtimes._deps import require

    ort = require("onnxruntime", extra="cpu", purpose="Calibration feeds for the decode graph")
    session = ort.InferenceSession(str(paths["prefill"]), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    feeds: dict[str, list[dict[str, np.ndarray]]] = {"prefill": [], "decode": []}
    for p in prompts[:2]:
        if isinstance(p, np.ndarray) and p.dtype.kind == "f":  # features [mels, frames] or pixels [3, h, w]
            source: dict[str, np.ndarray] = {"input_features" if p.ndim == 2 else "pixel_values": p[None].astype(np.float32)}
        else:
            ids = np.array([p], np.int64)
            source = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        pre = {**source, "decoder_input_ids": np.array([start], np.int64)}
        outs = dict(zip(names, session.run(names, pre)))
        feeds["prefill"].append(pre)
        feeds["decode"].append({
            "decoder_input_ids": outs["next_token"].astype(np.int64),
            **({"attention_mask": source["attention_mask"]} if "attention_mask" in source else {}),
            **{n.replace("present", "past_key_values"): v for n, v in outs.items() if n.startswith("present.")},
            **{n: v for n, v in outs.items() if n.startswith("cross.")},
        })
    return feeds
