"""CTC speech bundles without torch (runtimes/speech.py): a tiny random wav2vec2 with a real CTC tokenizer,
built with the shipped recordings as --data; transcripts against transformers' own decoding of the same
logits, per row over its own frames; the CLI; and no torch in the runtime."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runtimes.speech import ctc_decode, frames_for
from tests.conftest import ROOT, run_cli

SPEECH = ROOT / "tests" / "data" / "speech"
LETTERS = list("ETAOINSHRDLUCMFWYPVBGKQJXZ'")


def test_ctc_decode_collapses_repeats_and_drops_blanks():
    ctc = {"tokens": ["<pad>", "<s>", "</s>", "<unk>", "|", "A", "B"], "blank": 0, "word_delimiter": "|",
           "special_tokens": ["<s>", "</s>", "<pad>"]}
    assert ctc_decode([5, 5, 0, 5, 6, 4, 4, 6, 0, 0, 1], ctc) == "AAB B"
    assert ctc_decode([4, 5, 4], ctc) == "A" and ctc_decode([], ctc) == ""
    assert frames_for(48000, [10, 8, 8], [5, 8, 8]) == 149  # (((48000-10)//5+1)-8)//8+1 ... as transformers counts


def test_ctc_decode_equals_transformers_tokenizer_on_random_ids(tmp_path):
    import numpy as np
    import transformers

    from exporter.export.ctc import ctc_vocabulary

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", "|"] + LETTERS)}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    tok = transformers.Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json"), word_delimiter_token="|")
    tok.save_pretrained(tmp_path)
    ctc = ctc_vocabulary(tmp_path, None)
    assert ctc["blank"] == 0 and ctc["word_delimiter"] == "|" and "<pad>" not in ctc["special_tokens"]
    rng = np.random.default_rng(0)
    for _ in range(3000):
        ids = rng.integers(0, len(vocab), 12).tolist()
        assert ctc_decode(ids, ctc) == _text(tok, ids), ids


@pytest.fixture(scope="module")
def ctc_folder(tmp_path_factory) -> Path:
    import torch
    import transformers

    folder = tmp_path_factory.mktemp("w2v-ctc")
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", "|"] + LETTERS)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    tok = transformers.Wav2Vec2CTCTokenizer(str(folder / "vocab.json"), word_delimiter_token="|")
    tok.save_pretrained(folder)
    transformers.Wav2Vec2FeatureExtractor(sampling_rate=16000, return_attention_mask=True).save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=37, conv_dim=(32, 32, 32), conv_stride=(5, 8, 8),
                                         conv_kernel=(10, 8, 8), num_conv_pos_embeddings=16,
                                         num_conv_pos_embedding_groups=2, pad_token_id=0, feat_extract_norm="layer")
    model = transformers.Wav2Vec2ForCTC(config).eval()
    with torch.no_grad():  # a head that does not answer one token everywhere: decoding has work to do
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ctc_bundle(ctc_folder, tmp_path_factory) -> Path:
    from exporter.pipeline import BuildOptions, build

    res = build(f"hf:{ctc_folder}", BuildOptions(output=tmp_path_factory.mktemp("b") / "w2v", data=SPEECH))
    assert res.parity.status == "passed", res.parity.failures()
    return res.bundle


def _text(tok, ids) -> str:
    """transformers' greedy CTC decoding (decode: repeats collapse before blanks drop) without the text of its
    special tokens (<s>, </s>, <unk>), which the runtime leaves out."""
    text = tok.decode(ids)
    for special in (tok.bos_token, tok.eos_token, tok.unk_token):
        text = text.replace(special, "")
    return " ".join(text.split())


@pytest.mark.slow
def test_transcripts_equal_transformers_decoding(ctc_folder, ctc_bundle):
    import torch
    import transformers

    from runtimes.manifest import Manifest
    from runtimes.speech import Transcriber, read_wav, resample

    manifest = Manifest.read(ctc_bundle)
    assert manifest.source["ctc"] == "ctc.json" and "ctc.json" in manifest.files
    model = transformers.Wav2Vec2ForCTC.from_pretrained(str(ctc_folder)).eval()
    tok = transformers.Wav2Vec2CTCTokenizer.from_pretrained(str(ctc_folder))
    fx = transformers.Wav2Vec2FeatureExtractor.from_pretrained(str(ctc_folder))
    files = sorted(SPEECH.glob("*.wav"))[:2]  # within the 3 s range: nothing is cut
    clips = [resample(*read_wav(f), 16000) for f in files]
    batch = fx(clips, sampling_rate=16000, padding=True, return_attention_mask=True, return_tensors="pt")
    with torch.no_grad():
        ids = model(**batch).logits.argmax(-1)
    lengths = model._get_feat_extract_output_lengths(batch["attention_mask"].sum(-1))
    want = [_text(tok, row[:n].tolist()) for row, n in zip(ids, lengths)]
    with Transcriber(ctc_bundle) as t:
        got = t.transcribe_files(files)
        alone = [t.transcribe_files([f])[0] for f in files]
    assert got == want and any(want)
    single = fx(clips[0], sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        assert alone[0] == _text(tok, model(**single).logits.argmax(-1)[0].tolist())


@pytest.mark.slow
def test_cli_transcribe_and_its_refusals(ctc_bundle, tmp_path):
    ok = run_cli("transcribe", str(ctc_bundle), str(SPEECH / "hello.wav"), "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)[0]["file"].endswith("hello.wav")
    (tmp_path / "bad.wav").write_bytes(b"not a wav")
    bad = run_cli("transcribe", str(ctc_bundle), str(tmp_path / "bad.wav"))
    assert bad.returncode == 2 and "PCM .wav" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_speech_runtime_imports_no_torch(ctc_bundle):
    code = textwrap.dedent(f"""
        import sys
        from runtimes.speech import Transcriber
        with Transcriber({str(ctc_bundle)!r}) as t:
            text = t.transcribe_files([{str(SPEECH / "hello.wav")!r}])
        heavy = [m for m in ("torch", "transformers", "exporter", "calibration") if m in sys.modules]
        print("HEAVY:", heavy, len(text))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY: [] 1" in proc.stdout


def test_numpy_log_mel_equals_whisper_feature_extractor():
    """runtimes/speech.py log_mel (no torch, no transformers) against WhisperFeatureExtractor on real speech: its
    numpy path to float32 rounding, its default (torch STFT) path to 1e-4."""
    import numpy as np
    import transformers

    from runtimes.speech import log_mel, read_wav, resample

    for mels in (80, 128):
        fe = transformers.WhisperFeatureExtractor(feature_size=mels)
        for path in sorted((Path(__file__).parents[1] / "data" / "speech").glob("*.wav")):
            samples, rate = read_wav(path)
            clip = resample(samples, rate, 16000)
            got = log_mel(clip, fe.mel_filters, n_fft=fe.n_fft, hop_length=fe.hop_length, n_samples=fe.n_samples)
            padded = np.pad(clip, (0, fe.n_samples - len(clip)))[None]
            assert np.abs(got - fe._np_extract_fbank_features(padded, "cpu")[0]).max() < 1e-5
            assert np.abs(got - fe(clip, sampling_rate=16000, return_tensors="np").input_features[0]).max() < 1e-4
