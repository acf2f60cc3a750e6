"""Audio data for speech models (`--data`/`--calib` of .wav files): waveforms as the model's feature
extractor prepares them.

A .wav file (PCM, 8/16/24/32-bit, any channel count and rate; runtimes/speech.py reads it)
becomes one mono float waveform in [-1, 1], resampled to the feature extractor's `sampling_rate`
(`preprocessor_config.json` of the model folder, else 16 kHz) with scipy's polyphase filter, then
normalized per clip to zero mean and unit variance when the config says `do_normalize` (wav2vec2,
HuBERT, WavLM): what transformers' Wav2Vec2FeatureExtractor computes. A batch pads its clips to the
longest with the config's `padding_value` and an `attention_mask` of 0 there; a clip longer than the
engine's `samples` range is cut to its maximum (said in the notes).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtimes.errors import DataError
from runtimes.manifest import IOSpec
from runtimes.speech import normalize, pad_clips, read_wav, resample

__all__ = ["AUDIO_INPUT", "AUDIO_SUFFIXES", "FeatureConfig", "audio_files", "batch_clips", "is_audio_io", "load_clips",
           "read_wav", "resample"]

AUDIO_SUFFIXES = (".wav",)
AUDIO_INPUT = "input_values"


@dataclass(frozen=True)
class FeatureConfig:
    sampling_rate: int = 16000
    do_normalize: bool = True
    padding_value: float = 0.0

    @classmethod
    def of(cls, folder: Path | None) -> FeatureConfig:
        path = Path(folder) / "preprocessor_config.json" if folder else None
        if path is None or not path.is_file():
            return cls()
        cfg = json.loads(path.read_text())
        return cls(int(cfg.get("sampling_rate", 16000)), bool(cfg.get("do_normalize", True)),
                   float(cfg.get("padding_value", 0.0)))


def is_audio_io(io: IOSpec) -> bool:
    return any(s.name == AUDIO_INPUT for s in io.inputs)


def audio_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)


def load_clips(files: Sequence[Path], io: IOSpec, folder: Path | None) -> tuple[list[np.ndarray], list[str]]:
    """Every file as a model-ready waveform (resampled, cut to the samples range, normalized), and notes on
    what was not used as given."""
    notes: list[str] = []
    cfg = FeatureConfig.of(folder)
    spec = next(s for s in io.inputs if s.name == AUDIO_INPUT)
    dim = spec.shape[-1]
    limit = io.dims[dim].max if isinstance(dim, str) and dim in io.dims else None
    least = io.dims[dim].min if isinstance(dim, str) and dim in io.dims else 1
    clips, cut, short = [], 0, []
    for path in files:
        samples, rate = read_wav(path)
        samples = resample(samples, rate, cfg.sampling_rate)
        if limit is not None and len(samples) > limit:
            samples, cut = samples[:limit], cut + 1
        if len(samples) < least:
            short.append(path.name)
            continue
        clips.append(normalize(samples, cfg.do_normalize))
    if cut:
        notes.append(f"{cut} of {len(files)} recordings were cut to the engine's {limit} samples "
                     f"({limit / cfg.sampling_rate:.2f} s at {cfg.sampling_rate} Hz)")
    if short:
        notes.append(f"skipped {len(short)} recording(s) shorter than the engine's {least} samples: {', '.join(short[:5])}")
    if not clips:
        raise DataError(f"Expected recordings of at least {least} samples at {cfg.sampling_rate} Hz, found none in "
                        f"{len(files)} file(s). Pass longer recordings.")
    return clips, notes


def batch_clips(clips: Sequence[np.ndarray], io: IOSpec, batch_size: int, folder: Path | None) -> list[dict[str, Any]]:
    """Feed dicts of up to `batch_size` clips, each padded to its batch's longest (mask 0 on the padding)."""
    cfg = FeatureConfig.of(folder)
    names = {s.name for s in io.inputs}
    feeds = []
    for i in range(0, len(clips), batch_size):
        values, mask = pad_clips(clips[i:i + batch_size], cfg.padding_value)
        feeds.append({AUDIO_INPUT: values, **({"attention_mask": mask} if "attention_mask" in names else {})})
    return feeds
