"""The seq2seq recipe's non-text encoder inputs: Whisper's log-mel settings and filter bank, BLIP's image
preprocessing, and the gate's clips and photos. The runtime computes the same features in numpy
(runtimes/speech.py log_mel) from the filter bank that transformers' WhisperFeatureExtractor computed at build
time, and normalizes pixels with the processor's recorded mean and std, so neither needs transformers."""

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


# -- captioning (BLIP): the bundle's image preprocessing and the gate's photos --------------------------------
GATE_PHOTOS = ("astronaut", "coffee", "chelsea")  # scikit-image's bundled photos (the VLM gate's too)


def image_spec(folder: Path, cache: Any) -> tuple[Any, dict[str, Any]]:
    """(the model's image processor, generation.json's "image": size, rescale, mean and std, which the runtime
    applies after the caller resized the image to that size)."""
    import transformers

    _, height, width = cache.image
    if (folder / "preprocessor_config.json").is_file():
        processor = transformers.BlipImageProcessor.from_pretrained(str(folder))
    else:  # a model saved without its processor: BLIP's defaults at the vision tower's size
        processor = transformers.BlipImageProcessor(size={"height": height, "width": width})
    size = processor.size
    if (int(size["height"]), int(size["width"])) != (height, width):
        raise DataError(f"Expected the image processor of '{folder}' to resize to the vision tower's {height}×{width}, "
                        f"found {size}. Fix preprocessor_config.json to match the model's vision_config.image_size.")
    spec = {"size": [height, width], "rescale": float(processor.rescale_factor) if processor.do_rescale else 1.0,
            "mean": [float(m) for m in processor.image_mean], "std": [float(s) for s in processor.image_std],
            "resample": "bicubic"}
    return processor, spec


def caption_prompts(processor: Any, data: Path | None, spec: dict[str, Any]) -> list[np.ndarray]:
    """The gate's pixel_values [3, h, w]: --data (an image file or a folder of them, the first three), else
    scikit-image's photos, each through the model's image processor."""
    from PIL import Image

    if data is None:
        import skimage.data

        images = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in GATE_PHOTOS]
    else:
        path = Path(data)
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))[:GATE_CLIPS] \
            if path.is_dir() else [path]
        try:
            images = [Image.open(f).convert("RGB") for f in files]
        except OSError as exc:
            raise DataError(f"Expected --data for a captioning model as an image file or a folder of .jpg/.png "
                            f"files, found '{data}' ({exc}).") from None
        if not images:
            raise DataError(f"Expected --data for a captioning model to hold .jpg/.png files, found none in '{data}'.")
    return [np.asarray(processor(images=im, return_tensors="np").pixel_values[0], np.float32) for im in images]
