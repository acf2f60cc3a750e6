"""Encoder-decoder (seq2seq) bundles: tiny BART and T5 built from configs, gated against transformers' generate(),
and the torch-free loop (runtimes/seq2seq.py) checked token for token against generate() for greedy decoding
and beam search (several beam counts, length penalties, early-stopping modes, end-of-sequence tokens)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from exporter.pipeline import BuildOptions, build
from runtimes.errors import InvalidInput, UsageError
from runtimes.generate import SamplingOptions, Seq2SeqGenerator, load_generator
from tests.models.seq2seq import tiny_seq2seq

SOURCES = ["The capital of France is", "Once upon a time, in a small village", "def fibonacci(n):", "Engines run"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{family: (model folder, fp32 bundle)} for BART and T5."""
    root = tmp_path_factory.mktemp("seq2seq")
    out = {}
    for family in ("bart", "t5"):
        folder = tiny_seq2seq(root / f"{family}-src", family)
        res = build(f"hf:{folder}", BuildOptions(output=root / f"{family}-fp32", shapes=_shapes()))
        out[family] = (folder, res)
    return out


def _shapes():
    from exporter.source.shapes import parse_shapes

    return parse_shapes("batch=1:1:16,sequence=1:16:64,total_sequence=2:24:48")


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_seq2seq_bundle_passes_the_token_gate(built, family):
    _folder, res = built[family]
    assert res.parity.status == "passed"
    notes = " ".join(res.parity.notes)
    assert "identical for 32 steps" in notes and "batch" in notes
    m = res.manifest
    assert m.target.options["architecture"] == "seq2seq" and m.source["family"] == "seq2seq"
    spec = json.loads((res.bundle / "generation.json").read_text())
    assert spec["architecture"] == "seq2seq" and spec["decoder_start_ids"] == [0]
    assert spec["forced_eos_token_id"] == (0 if family == "bart" else None)
    decode = {s["name"] for s in spec["components"]["decode"]["io"]["inputs"]}
    assert {"decoder_input_ids", "attention_mask", "past_key_values.0.key", "cross.1.value"} <= decode


def _reference(model, tok, text, k, eos, **kw):
    import torch

    ids = tok(text, return_tensors="pt")
    out = model.generate(**ids, num_beams=k, max_new_tokens=20, do_sample=False, eos_token_id=eos, pad_token_id=0, **kw)
    tokens = out[0, 1:].tolist()
    if eos in tokens:  # generate() pads a finished hypothesis to the batch's length
        tokens = tokens[:tokens.index(eos) + 1]
    assert isinstance(out, torch.Tensor)
    return tokens


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_greedy_and_beam_search_match_transformers_generate(built, family):
    import transformers

    folder, res = built[family]
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    cases = [(k, lp, es) for k in (1, 2, 4) for lp, es in ((1.0, False), (2.0, True), (0.5, "never"))]
    with load_generator(res.bundle) as gen:
        assert isinstance(gen, Seq2SeqGenerator)
        # eos 0 is the model's own; a frequent token as eos makes hypotheses finish early (the beam bookkeeping)
        frequent = max(set(t for s in SOURCES for t in gen.generate(s, SamplingOptions(max_new_tokens=20)).tokens),
                       key=lambda t: t != 0)
        mismatches = []
        for eos in (0, frequent):
            for k, lp, es in cases:
                for text in SOURCES:
                    want = _reference(model, tok, text, k, eos, length_penalty=lp, early_stopping=es)
                    got = gen.generate(text, SamplingOptions(max_new_tokens=20, num_beams=k, length_penalty=lp,
                                                             early_stopping=es, stop_token_ids=[eos])).tokens
                    if got != want:
                        mismatches.append((eos, k, lp, es, text, want, got))
    assert not mismatches, mismatches[:3]


def test_a_padded_batch_of_sources_decodes_as_each_alone(built):
    _folder, res = built["bart"]
    with load_generator(res.bundle) as gen:
        for k in (1, 3):
            opts = SamplingOptions(max_new_tokens=12, num_beams=k)
            batch = [r.tokens for r in gen.generate_batch(SOURCES, opts)]
            alone = [gen.generate(s, opts).tokens for s in SOURCES]
            assert batch == alone


def test_seq2seq_refusals_are_one_paragraph(built):
    _folder, res = built["bart"]
    with load_generator(res.bundle) as gen:
        with pytest.raises(InvalidInput, match="at most 64 tokens"):
            gen.generate_ids([[5] * 65], SamplingOptions(max_new_tokens=2))
        with pytest.raises(UsageError, match="rows"):
            gen.generate_ids([[5, 6]] * 5, SamplingOptions(max_new_tokens=2, num_beams=4))
        with pytest.raises(UsageError, match="greedy options for beam search"):
            gen.generate_ids([[5, 6]], SamplingOptions(max_new_tokens=2, num_beams=2, temperature=0.7))


def test_causal_bundles_refuse_beam_search():
    from runtimes.decoding import Generator

    gen = Generator.__new__(Generator)  # the check comes before anything of the bundle is read
    with pytest.raises(UsageError, match="num_beams 1 for a causal LM"):
        Generator.generate_ids(gen, [[1]], SamplingOptions(num_beams=2))


def test_seq2seq_fp16_and_int8_pass_their_gates(built, tmp_path):
    folder, _res = built["bart"]
    for precision in ("fp16", "int8"):
        res = build(f"hf:{folder}", BuildOptions(precision=precision, output=tmp_path / precision, shapes=_shapes()))
        assert res.parity.status == "passed", precision
        if precision == "fp16":
            assert any(n.startswith("fp16-emulated prompt[0]: identical") for n in res.parity.notes)
        with load_generator(res.bundle) as gen:
            assert len(gen.generate(SOURCES[0], SamplingOptions(max_new_tokens=4, num_beams=2)).tokens) >= 1


def test_cli_generate_runs_a_seq2seq_bundle_with_beams(built):
    from typer.testing import CliRunner

    from exporter.cli import app

    _folder, res = built["t5"]
    out = CliRunner().invoke(app, ["generate", str(res.bundle), "--prompt", SOURCES[0], "--prompt", SOURCES[1],
                                   "--num-beams", "3", "-n", "8", "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)
    with load_generator(res.bundle) as gen:
        want = [r.tokens for r in gen.generate_batch(SOURCES[:2], SamplingOptions(max_new_tokens=8, num_beams=3))]
    assert [r["tokens"] for r in rows] == want
    assert np.all([len(r["tokens"]) <= 8 for r in rows])


# -- speech: Whisper -----------------------------------------------------------------------------------------
SPEECH = sorted((__import__("pathlib").Path(__file__).parents[2] / "data" / "speech").glob("*.wav"))


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    root = tmp_path_factory.mktemp("whisper")
    folder = tiny_seq2seq(root / "src", "whisper")
    res = build(f"hf:{folder}", BuildOptions(output=root / "fp32", data=SPEECH[0].parent))
    return folder, res


def test_whisper_bundle_passes_its_gate_on_real_speech(whisper):
    _folder, res = whisper
    assert res.parity.status == "passed"
    assert sum("identical for 32 steps" in n for n in res.parity.notes) == 4  # 3 clips and their batch
    spec = json.loads((res.bundle / "generation.json").read_text())
    assert spec["features"]["kind"] == "whisper-log-mel" and spec["features"]["frames"] == 3000
    assert "mel_filters.npy" in res.manifest.files and res.manifest.source["task"] == "automatic-speech-recognition"
    prefill = {s["name"] for s in spec["components"]["prefill"]["io"]["inputs"]}
    assert prefill == {"input_features", "decoder_input_ids"}


def test_whisper_transcribes_wav_files_as_transformers_generate_does(whisper):
    import torch
    import transformers
    from transformers.generation.utils import GenerationMixin

    from runtimes.speech import log_mel, read_wav, resample

    folder, res = whisper
    model = transformers.WhisperForConditionalGeneration.from_pretrained(folder).eval()
    extractor = transformers.WhisperFeatureExtractor(feature_size=80)
    with load_generator(res.bundle) as gen:
        got = gen.transcribe([str(p) for p in SPEECH], SamplingOptions(max_new_tokens=12))
        for path, r in zip(SPEECH, got):
            samples, rate = read_wav(path)
            feats = log_mel(resample(samples, rate, 16000), extractor.mel_filters)
            want = GenerationMixin.generate(model, input_features=torch.from_numpy(feats[None]), max_new_tokens=12,
                                            do_sample=False, decoder_input_ids=torch.tensor([[1]]))[0, 1:].tolist()
            if 0 in want:
                want = want[:want.index(0) + 1]
            assert r.tokens == want and r.text == gen.tokenizer.decode(r.tokens)
        with pytest.raises(UsageError, match="Expected audio"):
            gen.generate("hello")
        with pytest.raises(InvalidInput, match="log-mel features of shape"):
            gen.generate_ids([np.zeros((80, 100), np.float32)])


def test_cli_transcribes_with_audio_and_refuses_a_text_prompt(whisper):
    from typer.testing import CliRunner

    from exporter.cli import app

    _folder, res = whisper
    out = CliRunner().invoke(app, ["generate", str(res.bundle), "--audio", str(SPEECH[0]), "-n", "6", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)[0]["audio"] == str(SPEECH[0])
    assert CliRunner().invoke(app, ["generate", str(res.bundle), "--prompt", "hi"]).exit_code == 2
    assert CliRunner().invoke(app, ["generate", str(res.bundle)]).exit_code == 2


# -- captioning: BLIP -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    root = tmp_path_factory.mktemp("blip")
    folder = tiny_seq2seq(root / "src", "blip")
    return folder, build(f"hf:{folder}", BuildOptions(output=root / "fp32"))


def _photos():
    import skimage.data
    from PIL import Image

    return [Image.fromarray(getattr(skimage.data, n)()).convert("RGB") for n in ("rocket", "camera", "coffee")]


def test_blip_captions_pass_the_gate_and_equal_transformers_generate(blip):
    import torch
    import transformers
    from PIL import Image

    folder, res = blip
    assert res.parity.status == "passed" and res.manifest.source["task"] == "image-to-text"
    assert sum("identical for 32 steps" in n for n in res.parity.notes) == 4
    model = transformers.BlipForConditionalGeneration.from_pretrained(folder).eval()
    processor = transformers.BlipImageProcessor(size={"height": 32, "width": 32})
    photos = _photos()
    with load_generator(res.bundle) as gen:
        got = gen.caption([np.asarray(p.resize((32, 32), Image.BICUBIC)) for p in photos],
                          SamplingOptions(max_new_tokens=10))
        for photo, r in zip(photos, got):
            pixels = torch.from_numpy(processor(images=photo, return_tensors="np").pixel_values)
            want = model.generate(pixel_values=pixels, max_new_tokens=10, do_sample=False)[0, 1:].tolist()
            if 2 in want:  # BLIP's generate() stops at [SEP] (2 here) and pads after it
                want = want[:want.index(2) + 1]
            assert r.tokens == want
        with pytest.raises(UsageError, match="Expected an image"):
            gen.generate("a photo of")
        with pytest.raises(InvalidInput, match="32×32"):
            gen.caption([np.zeros((64, 64, 3), np.uint8)])


def test_cli_captions_an_image_file(blip, tmp_path):
    from typer.testing import CliRunner

    from exporter.cli import app

    _folder, res = blip
    path = tmp_path / "coffee.png"
    _photos()[2].save(path)
    out = CliRunner().invoke(app, ["generate", str(res.bundle), "--image", str(path), "--resize", "-n", "5", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)[0]["image"] == str(path)
    assert CliRunner().invoke(app, ["generate", str(res.bundle), "--image", str(path)]).exit_code == 2  # not resized
    assert CliRunner().invoke(app, ["generate", str(res.bundle), "--prompt", "a photo of"]).exit_code == 2


def test_encoder_decoders_without_a_recipe_are_refused_before_loading(tmp_path):
    """A speech encoder-decoder enginekit does not build (Speech2Text): exit 2, one paragraph, nothing loaded."""
    from typer.testing import CliRunner

    from exporter.cli import app

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "speech_to_text", "is_encoder_decoder": True,
                                                      "architectures": ["Speech2TextForConditionalGeneration"]}))
    out = CliRunner().invoke(app, ["build", f"hf:{tmp_path}", "-o", str(tmp_path / "out")])
    assert out.exit_code == 2 and "no recipe for it" in out.output and "Traceback" not in out.output


@pytest.mark.gpu
def test_cuda_seq2seq_bundles_pass_their_gate_and_decode_as_on_the_cpu(tmp_path):
    """On a GPU: BART fp16 and bf16 gated for real on ORT CUDA, and the CUDA loop (IO binding; cross keys/values
    and the past as device OrtValues, the beam cache reordered on the host) gives the CPU loop's tokens."""
    folder = tiny_seq2seq(tmp_path / "src", "bart")
    for precision in ("fp16", "bf16"):
        res = build(f"hf:{folder}", BuildOptions(output=tmp_path / precision, device="cuda", precision=precision,
                                                 shapes=_shapes()))
        assert res.parity.status == "passed", (precision, res.parity.failures())
    fp32 = build(f"hf:{folder}", BuildOptions(output=tmp_path / "fp32", device="cuda", shapes=_shapes()))
    with load_generator(fp32.bundle, device="cuda") as g, load_generator(fp32.bundle, device="cpu") as c:
        for k in (1, 3):
            opts = SamplingOptions(max_new_tokens=16, num_beams=k)
            assert [r.tokens for r in g.generate_batch(SOURCES, opts)] == [r.tokens for r in c.generate_batch(SOURCES, opts)]
