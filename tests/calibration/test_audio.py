""".wav data for speech models (calibration/audio.py): PCM of every width, resampling, and the features
against transformers' Wav2Vec2FeatureExtractor; a tiny wav2vec2 CTC model gated on the shipped recordings."""

import wave
from pathlib import Path

import numpy as np
import pytest

from calibration.audio import FeatureConfig, batch_clips, load_clips, read_wav, resample
from calibration.data import load_feeds
from runtimes.errors import DataError
from runtimes.manifest import DimRange, IOSpec, TensorSpec
from tests.conftest import ROOT

SPEECH = ROOT / "tests" / "data" / "speech"
IO = IOSpec([TensorSpec("input_values", "float32", ("batch", "samples")), TensorSpec("attention_mask", "int64", ("batch", "samples"))],
            [TensorSpec("logits", "float32", ("batch", "frames", 32))],
            {"batch": DimRange(1, 2, 8), "samples": DimRange(400, 16000, 48000)})


def _write(path: Path, ints: np.ndarray, width: int, rate: int = 8000) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(ints.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        if width == 3:
            b = ints.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3]
            w.writeframes(b.tobytes())
        else:
            w.writeframes(ints.astype({1: np.uint8, 2: "<i2", 4: "<i4"}[width]).tobytes())


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_pcm_of_every_width_reads_as_mono_floats(tmp_path, width):
    full = float(1 << (8 * width - 1))
    left = np.array([0.5, -0.25, 0.0, 0.75])
    right = np.array([0.0, -0.25, 0.5, 0.25])
    stereo = np.stack([left, right], 1) * full + (128 if width == 1 else 0)
    _write(tmp_path / "s.wav", stereo.round(), width)
    got, rate = read_wav(tmp_path / "s.wav")
    assert rate == 8000 and np.allclose(got, (left + right) / 2, atol=2 / full)


def test_unreadable_and_empty_files_are_refused(tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"RIFF0000WAVEnope")
    with pytest.raises(DataError, match="PCM .wav.*ffmpeg"):
        read_wav(tmp_path / "bad.wav")
    _write(tmp_path / "empty.wav", np.zeros((0, 1)), 2)
    with pytest.raises(DataError, match="empty recording"):
        read_wav(tmp_path / "empty.wav")


def test_features_equal_transformers_feature_extractor(tmp_path):
    transformers = pytest.importorskip("transformers")
    fx = transformers.Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True, return_attention_mask=True,
                                               padding_value=0.0)
    fx.save_pretrained(tmp_path)
    files = sorted(SPEECH.glob("*.wav"))
    clips, notes = load_clips(files, IO, tmp_path)
    assert notes == ["1 of 3 recordings were cut to the engine's 48000 samples (3.00 s at 16000 Hz)"]
    raw = [resample(read_wav(f)[0], 22050, 16000)[:48000] for f in files]
    want = fx(raw, sampling_rate=16000, padding=True, return_attention_mask=True, return_tensors="np")
    (got,) = batch_clips(clips, IO, 8, tmp_path)
    assert np.allclose(got["input_values"], want["input_values"], atol=1e-5)
    assert np.array_equal(got["attention_mask"], want["attention_mask"])
    # the loader for --data/--calib gives the same batches
    (fed,) = load_feeds(SPEECH, IO, tokenizer_dir=tmp_path, batch_size=8)
    assert np.allclose(fed["input_values"], got["input_values"]) and fed["input_values"].dtype == np.float32
    assert FeatureConfig.of(tmp_path).sampling_rate == 16000 and FeatureConfig.of(None) == FeatureConfig()


def test_resampling_keeps_a_tone_and_its_length():
    t = np.arange(22050) / 22050
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    out = resample(tone, 22050, 16000)
    assert len(out) == 16000
    peak = np.abs(np.fft.rfft(out)).argmax()  # 1 Hz bins over one second
    assert abs(peak - 440) <= 1


def test_audio_data_for_a_text_model_is_refused():
    io = IOSpec([TensorSpec("input_ids", "int64", ("batch", "sequence"))], [TensorSpec("y", "float32", ("batch",))],
                {"batch": DimRange(1, 1, 4), "sequence": DimRange(1, 8, 16)})
    with pytest.raises(DataError, match="only speech models"):
        load_feeds(SPEECH, io)


@pytest.mark.slow
def test_a_speech_model_is_gated_on_the_shipped_recordings(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    from exporter.pipeline import BuildOptions, build

    folder = tmp_path / "w2v"
    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=37, conv_dim=(32, 32, 32), conv_stride=(5, 8, 8),
                                         conv_kernel=(10, 8, 8), num_conv_pos_embeddings=16,
                                         num_conv_pos_embedding_groups=2, pad_token_id=0)
    transformers.Wav2Vec2ForCTC(config).eval().save_pretrained(folder)
    transformers.Wav2Vec2FeatureExtractor(sampling_rate=16000, return_attention_mask=True).save_pretrained(folder)
    res = build(f"hf:{folder}", BuildOptions(output=tmp_path / "bundle", data=SPEECH))
    assert res.parity.status == "passed", res.parity.failures()
    data = [c for c in res.parity.cases if c.label.startswith("data[")]
    assert len(data) == 1 and data[0].input_shapes["input_values"] == [3, 48000]
