"""Model families: which inputs a Hugging Face model takes, their dims and valid values.

One explicit table, read from the model's config so users write no dummy inputs for common
families. A family lists candidate inputs; those the model's forward() does not accept are
dropped (DistilBERT has no token_type_ids, SigLIP no attention_mask). Numbers come from the
config (`FromConfig`), e.g. the vocabulary size bounds generated token ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runtimes.errors import SourceError
from runtimes.manifest import DimRange, TensorSpec

# Default dynamic ranges (min, opt, max). opt is what TensorRT profiles tune for; --shapes changes them.
BATCH = (1, 4, 16)


@dataclass(frozen=True)
class FromConfig:
    """An int read from an HF config: the first attribute path present (dotted), capped at `cap`."""

    paths: tuple[str, ...]
    default: int
    cap: int | None = None
    index: int = 0  # for values given as [height, width]

    def resolve(self, config: Any) -> int:
        for path in self.paths:
            value: Any = config
            for part in path.split("."):
                value = getattr(value, part, None)
                if value is None:
                    break
            if value is not None:
                if isinstance(value, (list, tuple)):
                    value = value[min(self.index, len(value) - 1)]
                value = int(value)
                return min(value, self.cap) if self.cap else value
        return self.default


VOCAB = FromConfig(("text_config.vocab_size", "vocab_size"), 30522)
TYPE_VOCAB = FromConfig(("type_vocab_size",), 2)  # 0 in DeBERTa-v2's config: no table, the ids are ignored
# The rows of a text model's position table, and (MAX_POSITIONS) the longest sequence by default: capped at 512
# tokens, since parity at the max shape runs on the CPU; --shapes raises it.
POSITION_ROWS = FromConfig(("text_config.max_position_embeddings", "max_position_embeddings", "n_positions"), 512)
MAX_POSITIONS = FromConfig(POSITION_ROWS.paths, 512, cap=512)
# Models whose position ids start after the padding index (fairseq's convention: position padding_idx + 1 for
# the first token), so a table of N positions holds N - padding_idx - 1 tokens: RoBERTa's 514 rows hold 512.
OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "mpnet", "longformer", "data2vec-text", "xlm-roberta-xl",
                    "ibert", "roberta-prelayernorm", "xmod", "luke")


@dataclass(frozen=True)
class SequenceLimit:
    """The longest sequence a text model's position table holds, capped like MAX_POSITIONS: its rows, less
    the padding offset for OFFSET_POSITIONS models (a longer input indexes past the table: IndexError in the
    reference)."""

    def resolve(self, config: Any) -> int:
        rows = POSITION_ROWS.resolve(config)
        if getattr(config, "model_type", None) in OFFSET_POSITIONS:
            rows -= int(getattr(config, "pad_token_id", None) or 0) + 1
        return max(1, min(rows, MAX_POSITIONS.cap or rows))


IMAGE_H = FromConfig(("vision_config.image_size", "image_size"), 224, index=0)
IMAGE_W = FromConfig(("vision_config.image_size", "image_size"), 224, index=1)
CHANNELS = FromConfig(("vision_config.num_channels", "num_channels"), 3)


@dataclass(frozen=True)
class ReceptiveField:
    """The fewest audio samples a wav2vec2-style convolutional feature encoder turns into two frames: one
    frame needs the receptive field (400 for wav2vec2-base: kernels 10,3,3,3,3,2,2, strides 5,2,2,2,2,2,2),
    each more one hop (320); torch.export wants the frame dim >= 2 (it specializes a dim of size 1)."""

    def resolve(self, config: Any) -> int:
        kernels = list(getattr(config, "conv_kernel", None) or [400])
        strides = list(getattr(config, "conv_stride", None) or [1] * len(kernels))
        field, jump = kernels[0], strides[0]
        for k, stride in zip(kernels[1:], strides[1:]):
            field += (k - 1) * jump
            jump *= stride
        return int(field + jump)


@dataclass(frozen=True)
class InputRecipe:
    name: str
    dtype: str
    shape: tuple[Any, ...]  # dim names, ints or FromConfig
    values: dict[str, Any] = field(default_factory=dict)  # value hint; FromConfig entries resolved


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    inputs: tuple[InputRecipe, ...]
    dims: dict[str, tuple[Any, Any, Any]]


def _text(batch: str) -> tuple[InputRecipe, ...]:
    return (
        InputRecipe("input_ids", "int64", (batch, "sequence"), {"kind": "randint", "low": 0, "high": VOCAB}),
        InputRecipe("attention_mask", "int64", (batch, "sequence"), {"kind": "mask"}),
        InputRecipe("token_type_ids", "int64", (batch, "sequence"), {"kind": "randint", "low": 0, "high": TYPE_VOCAB}),
    )


def _pixels(batch: str) -> InputRecipe:
    return InputRecipe("pixel_values", "float32", (batch, CHANNELS, IMAGE_H, IMAGE_W), {"kind": "normal", "std": 1.0})


FAMILIES: tuple[Family, ...] = (
    Family(
        "text-encoder",
        ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "mpnet", "electra", "albert", "deberta",
         "deberta-v2", "modernbert", "xlm", "nomic_bert", "clip_text_model", "siglip_text_model", "ernie"),
        _text("batch"),
        {"batch": BATCH, "sequence": (1, 128, SequenceLimit())},
    ),
    Family(
        "decoder",
        ("gpt2", "llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "phi", "phi3", "gemma", "gemma2",
         "gemma3_text", "olmo", "olmo2", "granite", "smollm3", "stablelm", "starcoder2", "gpt_neox", "opt", "falcon"),
        _text("batch")[:2],
        {"batch": BATCH, "sequence": (1, 64, MAX_POSITIONS)},
    ),
    Family(
        "vision",
        ("vit", "deit", "beit", "dinov2", "convnext", "convnextv2", "resnet", "regnet", "mobilenet_v2", "efficientnet",
         "swin", "swinv2", "clip_vision_model", "siglip_vision_model", "levit", "poolformer", "mobilevit", "dit",
         "van", "bit", "focalnet", "hiera"),
        (_pixels("batch"),),
        {"batch": BATCH},
    ),
    Family(
        "audio",
        ("wav2vec2", "hubert", "wavlm", "wav2vec2-conformer", "data2vec-audio", "unispeech", "unispeech-sat", "sew",
         "sew-d", "wav2vec2-bert"),
        # Raw 16 kHz waveforms as the feature extractor leaves them (zero mean, unit variance); mask 0 = padding.
        (InputRecipe("input_values", "float32", ("batch", "samples"), {"kind": "normal", "std": 1.0}),
         InputRecipe("attention_mask", "int64", ("batch", "samples"), {"kind": "mask"})),
        # 1 s at opt, 3 s at max (the gate runs every max-shape case on the CPU; --shapes samples=… for longer clips)
        {"batch": (1, 2, 8), "samples": (ReceptiveField(), 16000, 48000)},
    ),
    Family(
        "clip",
        ("clip", "siglip", "chinese_clip", "altclip"),
        _text("text_batch")[:2] + (_pixels("image_batch"),),
        {"text_batch": BATCH, "sequence": (1, MAX_POSITIONS, MAX_POSITIONS), "image_batch": BATCH},
    ),
)


def family_for(config: Any) -> Family:
    """The family of an HF config, by model_type, else by what the config describes."""
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    by_name = {f.name: f for f in FAMILIES}
    has_text = getattr(config, "vocab_size", None) is not None
    has_image = getattr(config, "image_size", None) is not None or getattr(config, "num_channels", None) is not None
    if getattr(config, "text_config", None) is not None and getattr(config, "vision_config", None) is not None:
        return by_name["clip"]
    if has_text and not has_image:
        return by_name["decoder" if getattr(config, "is_decoder", False) else "text-encoder"]
    if has_image and not has_text:
        return by_name["vision"]
    raise SourceError(
        f"Expected a model of a known family (text encoder, decoder LM, vision, CLIP-like), found model_type "
        f"'{model_type}' whose config names neither a vocabulary nor an image size. Export it with a "
        "py:MODULE:FACTORY source whose factory returns the model and example inputs."
    )


def resolve_inputs(
    fam: Family, config: Any, accepted: set[str] | None
) -> tuple[list[TensorSpec], dict[str, DimRange], dict[str, dict[str, Any]]]:
    """Input specs, default dim ranges and value hints of `fam` for `config`.

    accepted: the parameter names of the model's forward() (None keeps every input).
    """
    specs: list[TensorSpec] = []
    hints: dict[str, dict[str, Any]] = {}
    used_dims: set[str] = set()
    for rec in fam.inputs:
        if accepted is not None and rec.name not in accepted:
            continue
        shape = tuple(d.resolve(config) if isinstance(d, FromConfig) else d for d in rec.shape)
        specs.append(TensorSpec(rec.name, rec.dtype, shape))
        hints[rec.name] = {k: (v.resolve(config) if isinstance(v, FromConfig) else v) for k, v in rec.values.items()}
        if hints[rec.name].get("kind") == "randint" and hints[rec.name].get("high", 1) < 1:
            hints[rec.name]["high"] = 1  # an empty table (type_vocab_size 0): zeros are the only valid ids
        used_dims.update(d for d in shape if isinstance(d, str))
    if not specs:
        raise SourceError(
            f"Expected the model's forward() to accept some of {[r.name for r in fam.inputs]} (family "
            f"'{fam.name}'), but it accepts {sorted(accepted or [])}. Use a py:MODULE:FACTORY source instead."
        )
    dims = {}
    for name, triple in fam.dims.items():
        if name in used_dims:
            lo, opt, hi = (v.resolve(config) if hasattr(v, "resolve") else int(v) for v in triple)
            hi = max(hi, lo)
            dims[name] = DimRange(lo, min(max(opt, lo), hi), hi)
    return specs, dims, hints
