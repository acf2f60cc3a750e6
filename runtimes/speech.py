"""Speech bundles without torch: .wav files in, text out (CTC models: wav2vec2, HuBERT, WavLM).

    from runtimes.speech import Transcriber
    with Transcriber("engines/wav2vec2-ctc") as t:
        print(t.transcribe_files(["hello.wav"]))

A CTC bundle ships `ctc.json` (written by `enginekit build` from the model's tokenizer and feature
extractor): the vocabulary in id order, the blank (pad) id, the word delimiter and the features the
model expects (sampling rate, per-clip normalization, padding value). Decoding is greedy CTC, what
transformers' Wav2Vec2CTCTokenizer.batch_decode gives for the logits' argmax: repeated ids collapse,
blanks drop, the word delimiter becomes a space. Each row is decoded over the frames its own samples
produce (the conv feature encoder's output length for the clip's length, from ctc.json), never over
the padding of a longer batch-mate.

Reading .wav uses the standard library (PCM 8/16/24/32-bit, any channel count); resampling to the
model's rate needs scipy (installed with `enginekit[build]`; at the model's own rate nothing is resampled).
"""

from __future__ import annotations

import itertools
import json
import math
import wave
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._deps import require
from .errors import DataError, UsageError
from .manifest import Manifest

CTC_FILE = "ctc.json"


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """(mono float32 samples in [-1, 1], sample rate) of a PCM .wav file; DataError with what to do otherwise."""
    path = Path(path)
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            raw = w.readframes(n)
    except (wave.Error, EOFError, OSError) as exc:
        raise DataError(
            f"Expected '{path}' to be a PCM .wav file, but it cannot be read ({exc}). Convert it to 16-bit PCM, e.g. "
            f"`ffmpeg -i {path.name} -acodec pcm_s16le fixed.wav`, and pass that."
        ) from None
    if width == 3:  # 24-bit: little-endian triplets, sign-extended into int32
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        data = (((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8) >> 8).astype(np.float32) / float(1 << 23)
    elif width in (1, 2, 4):
        ints = np.frombuffer(raw, {1: np.uint8, 2: np.int16, 4: np.int32}[width]).astype(np.float32)
        data = (ints - 128.0) / 128.0 if width == 1 else ints / float(1 << (8 * width - 1))
    else:
        raise DataError(f"Expected 8, 16, 24 or 32-bit samples in '{path}', found {8 * width}-bit. Convert it to "
                        "16-bit PCM and pass that.")
    if not len(data):
        raise DataError(f"Expected samples in '{path}', found an empty recording. Remove it from the data.")
    return data.reshape(-1, channels).mean(axis=1).astype(np.float32), rate


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """`samples` at `target` Hz (scipy.signal.resample_poly: polyphase, anti-aliased)."""
    if rate == target:
        return np.asarray(samples, np.float32)
    signal = require("scipy.signal", extra="build", purpose=f"Resampling audio from {rate} Hz to the model's {target} Hz")
    g = math.gcd(int(rate), int(target))
    return signal.resample_poly(samples, target // g, rate // g).astype(np.float32)


def normalize(samples: np.ndarray, do_normalize: bool = True) -> np.ndarray:
    """Zero mean, unit variance over the clip (Wav2Vec2FeatureExtractor's zero_mean_unit_var_norm)."""
    samples = np.asarray(samples, np.float32)
    if not do_normalize:
        return samples
    return ((samples - samples.mean()) / np.sqrt(samples.var() + 1e-7)).astype(np.float32)


def pad_clips(clips: Sequence[np.ndarray], padding_value: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(input_values [batch, longest], attention_mask [batch, longest]: 1 on samples, 0 on padding)."""
    longest = max(len(c) for c in clips)
    values = np.full((len(clips), longest), padding_value, np.float32)
    mask = np.zeros((len(clips), longest), np.int64)
    for row, clip in enumerate(clips):
        values[row, :len(clip)], mask[row, :len(clip)] = clip, 1
    return values, mask


def frames_for(samples: int, kernels: Sequence[int], strides: Sequence[int]) -> int:
    """Frames a conv feature encoder (no padding) makes of `samples` (transformers'
    _get_feat_extract_output_lengths)."""
    n = samples
    for k, s in zip(kernels, strides):
        n = (n - k) // s + 1
    return max(0, n)


def ctc_decode(ids: Sequence[int], ctc: dict[str, Any]) -> str:
    """Greedy CTC: repeats collapse, then blanks drop (so a letter repeated across a blank stays doubled), the
    tokenizer's other special tokens are left out, and the word delimiter becomes a space. That is
    Wav2Vec2CTCTokenizer.decode(ids) without the special tokens' text; decode(skip_special_tokens=True) drops
    the blanks before collapsing and merges such repeats (transformers 5.x), which is not CTC."""
    tokens, blank, delimiter = ctc["tokens"], ctc["blank"], ctc.get("word_delimiter")
    specials = set(ctc.get("special_tokens", []))
    out = [" " if tokens[t] == delimiter else tokens[t] for t, _ in itertools.groupby(int(i) for i in ids)
           if t != blank and 0 <= t < len(tokens) and tokens[t] not in specials]
    return " ".join("".join(out).split())


class Transcriber:
    """A CTC speech bundle: waveforms or .wav files → text (runtimes.load runs the engine)."""

    def __init__(self, bundle: str | Path, *, device: str | None = None, threads: int | None = None):
        from . import load

        self.bundle = Path(bundle)
        manifest = Manifest.read(self.bundle)
        name = manifest.source.get("ctc")
        if not name:
            raise UsageError(
                f"Expected a CTC speech bundle (manifest source.ctc naming {CTC_FILE}) at '{bundle}', found a bundle of "
                f"task '{manifest.source.get('task')}'. Build a wav2vec2/HuBERT/WavLM CTC model folder with its tokenizer "
                "(vocab.json) and feature extractor, or run this bundle with runtimes.load."
            )
        self.ctc = json.loads(manifest.file(self.bundle, name, "CTC vocabulary").read_text(encoding="utf-8"))
        self.runner = load(self.bundle, device=device, threads=threads)
        self.names = [s.name for s in manifest.io.inputs]

    def __enter__(self) -> Transcriber:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.runner.close()

    def transcribe(self, waveforms: Sequence[np.ndarray], sampling_rate: int | None = None) -> list[str]:
        """Text per waveform (mono floats at `sampling_rate`, default the model's), one batch."""
        feats = self.ctc["features"]
        rate = int(feats["sampling_rate"])
        clips = [normalize(resample(np.asarray(w, np.float32), sampling_rate or rate, rate), feats["do_normalize"])
                 for w in waveforms]
        values, mask = pad_clips(clips, feats["padding_value"])
        feeds = {"input_values": values, **({"attention_mask": mask} if "attention_mask" in self.names else {})}
        logits = np.asarray(self.runner.infer(feeds)["logits"])
        ids = logits.argmax(-1)
        conv = self.ctc.get("conv")
        return [ctc_decode(row[:frames_for(len(c), conv["kernels"], conv["strides"])] if conv else row, self.ctc)
                for row, c in zip(ids, clips)]

    def transcribe_files(self, paths: Sequence[str | Path]) -> list[str]:
        waves = [read_wav(p) for p in paths]
        rate = int(self.ctc["features"]["sampling_rate"])
        return self.transcribe([resample(w, r, rate) for w, r in waves], rate)


# -- Whisper-style log-mel features (speech encoder-decoders, runtimes/seq2seq.py) ---------------------------
def log_mel(samples: np.ndarray, mel_filters: np.ndarray, *, n_fft: int = 400, hop_length: int = 160,
            n_samples: int = 480000) -> np.ndarray:
    """Whisper's input features [mels, n_samples // hop_length] of one clip at the model's rate, in numpy: the
    clip zero-padded (or cut) to n_samples (30 s), a centred STFT (reflect padding, periodic Hann window of
    n_fft), power spectrum, the bundle's mel filter bank [n_fft // 2 + 1, mels] (written at build time by
    transformers' WhisperFeatureExtractor), log10 floored at 1e-10, the last frame dropped, clamped to 8
    below the clip's maximum and scaled as (x + 4) / 4. The same steps as the feature extractor's numpy path
    (tests/runtimes/test_speech.py compares them)."""
    x = np.zeros(n_samples, np.float64)
    clip = np.asarray(samples, np.float64)[:n_samples]
    x[:len(clip)] = clip
    pad = n_fft // 2
    x = np.pad(x, (pad, pad), mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    count = 1 + (len(x) - n_fft) // hop_length
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop_length][:count]
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2  # [frames, n_fft // 2 + 1]
    mel = np.maximum(power @ np.asarray(mel_filters, np.float64), 1e-10).T  # [mels, frames]
    spec = np.log10(mel)[:, :-1]
    spec = np.maximum(spec, spec.max() - 8.0)
    return ((spec + 4.0) / 4.0).astype(np.float32)
