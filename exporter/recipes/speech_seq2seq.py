"""The speech half of the seq2seq recipe (Whisper): the bundle's log-mel settings and filter bank, and the gate's
inputs. The runtime computes the same features in numpy (runtimes/speech.py log_mel) from the filter bank that
transformers' WhisperFeatureExtractor computed at build time, so no audio library is needed where it runs."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from runtimes.errors import DataError

MEL_FILTERS_FILE = "mel_filters.npy"
GATE_CLIPS = 3


def feature_spec(folder: Path, cache: Any) -> tuple[Any, dict[str, Any], dict[str, bytes]]:
    """(the model's feature extractor, generation.json's "features", {file name: bytes} for the bundle)."""
    import transformers

    if (folder / "preprocessor_config.json").is_file():
        extractor = transformers.WhisperFeatureExtractor.from_pretrained(str(folder))
    else:  # a model folder without one (save_pretrained of the model alone): Whisper's defaults at its mel count
        extractor = transformers.WhisperFeatureExtractor(feature_size=cache.mels)
    if extractor.feature_size != cache.mels or extractor.nb_max_frames != cache.frames:
        raise DataError(f"Expected the feature extractor of '{folder}' to make the encoder's {cache.mels} × "
                        f"{cache.frames} features, found {extractor.feature_size} × {extractor.nb_max_frames}. Fix "
                        "preprocessor_config.json (feature_size, chunk_length) to match the model's config.")
    buf = io.BytesIO()
    np.save(buf, np.asarray(extractor.mel_filters, np.float32))
    spec = {"kind": "whisper-log-mel", "file": MEL_FILTERS_FILE, "sampling_rate": int(extractor.sampling_rate),
            "n_fft": int(extractor.n_fft), "hop_length": int(extractor.hop_length), "n_samples": int(extractor.n_samples),
            "mels": cache.mels, "frames": cache.frames}
    return extractor, spec, {MEL_FILTERS_FILE: buf.getvalue()}


def speech_prompts(extractor: Any, data: Path | None, cache: Any) -> list[np.ndarray]:
    """The gate's encoder inputs: --data (a .wav file or a folder of them, the first three) through the model's
    feature extractor; else three seeded random feature arrays in log-mel's range [-1, 1]."""
    if data is None:
        rng = np.random.default_rng(0)
        return [rng.uniform(-1.0, 1.0, (cache.mels, cache.frames)).astype(np.float32) for _ in range(GATE_CLIPS)]
    from runtimes.speech import read_wav, resample

    path = Path(data)
    files = sorted(path.glob("*.wav"))[:GATE_CLIPS] if path.is_dir() else [path]
    if not files or any(f.suffix.lower() != ".wav" or not f.is_file() for f in files):
        raise DataError(f"Expected --data for a speech encoder-decoder as a .wav file or a folder of .wav files, "
                        f"found '{data}'.")
    rate = int(extractor.sampling_rate)
    out = []
    for f in files:
        samples, got = read_wav(f)
        feats = extractor(resample(samples, got, rate), sampling_rate=rate, return_tensors="np").input_features[0]
        out.append(np.asarray(feats, np.float32))
    return out
