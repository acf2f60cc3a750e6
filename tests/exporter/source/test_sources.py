"""SOURCE parsing and loading, including every bad source the CLI must explain."""


from types import SimpleNamespace

import onnx
import pytest

from exporter.source.families import family_for
from exporter.source.loading import load_source
from exporter.source.spec import model_name, parse_source
from runtimes.errors import SourceError
from tests.conftest import MODELS


def test_parse_forms(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"")
    assert parse_source("hf:org/name#sequence-classification").task == "sequence-classification"
    assert parse_source("py:pkg.mod:make").location == "pkg.mod:make"
    assert parse_source(str(tmp_path / "m.onnx")).kind == "onnx"
    assert parse_source(str(tmp_path)).kind == "hf"
    assert parse_source("timm:resnet50#pretrained").task == "pretrained"
    assert model_name(parse_source("hf:/x/All-MiniLM_L6")) == "all-minilm_l6"
    with pytest.raises(SourceError, match="Expected SOURCE"):
        parse_source("nonsense")
    with pytest.raises(SourceError, match="location"):
        parse_source("hf:")


def test_hf_family_inputs_from_config(tiny_bert_dir, tiny_clip_dir):
    bert = load_source(parse_source(f"hf:{tiny_bert_dir}"))
    assert [s.name for s in bert.io.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert bert.io.values["input_ids"] == {"kind": "randint", "low": 0, "high": 100}
    assert bert.io.dims["sequence"].max == 64  # max_position_embeddings of the config
    assert bert.module.output_names == ["last_hidden_state", "pooler_output"]
    clip = load_source(parse_source(f"hf:{tiny_clip_dir}"))
    assert clip.info["task"] == "zero-shot-image-classification"
    assert {s.name: s.shape for s in clip.io.inputs}["pixel_values"] == ("image_batch", 3, 32, 32)
    assert clip.module.output_names[:2] == ["logits_per_image", "logits_per_text"]


def test_unknown_family_falls_back_on_what_the_config_describes():
    from types import SimpleNamespace

    assert family_for(SimpleNamespace(model_type="newtext", vocab_size=10)).name == "text-encoder"
    assert family_for(SimpleNamespace(model_type="newvision", image_size=32)).name == "vision"
    with pytest.raises(SourceError, match="known family"):
        family_for(SimpleNamespace(model_type="audio"))


def test_py_factory_forms():
    two = load_source(parse_source(f"py:{MODELS / 'convnet.py'}:make_two_heads"))
    assert [s.shape for s in two.io.inputs] == [("x_batch", 8), ("y_batch", 6)]
    assert two.module.output_names == ["x_proj", "y_proj", "similarity"]
    conv = load_source(parse_source("py:tests.models.convnet:make"))
    assert conv.io.inputs[0].shape == ("batch", 3, 32, 32) and conv.module.output_names == ["output"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("hf:./definitely/missing/model", "found nothing there"),
        ("py:tests.models.nope:make", "importable Python module"),
        ("py:tests.models.convnet:nope", "callable 'nope'"),
        ("py:tests.models.convnet", "py:<module or file.py>:<factory>"),
        ("py:tests.models.convnet:make_not_a_model", "torch.nn.Module"),
        ("onnx:/no/such/file.onnx", "found nothing"),
    ],
)
def test_bad_sources(spec, message):
    with pytest.raises(SourceError, match=message):
        load_source(parse_source(spec))


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(SourceError, match=r"config.json.*notes.txt"):
        load_source(parse_source(f"hf:{tmp_path}"))


def test_unknown_task(tiny_bert_dir):
    with pytest.raises(SourceError, match="task among"):
        load_source(parse_source(f"hf:{tiny_bert_dir}#translation"))


def test_hub_id_without_network_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match="Without network access"):
        load_source(parse_source("hf:someorg/somemodel"))


def test_corrupt_and_truncated_onnx(tmp_path, bert_bundle):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage\xff\xff\xff")
    with pytest.raises(SourceError, match="corrupt|truncated|checker"):
        load_source(parse_source(f"onnx:{bad}"))
    data = (bert_bundle / "model.onnx").read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match="corrupt|truncated|checker"):
        load_source(parse_source(f"onnx:{cut}"))
    assert onnx.load(str(bert_bundle / "model.onnx")) is not None


def test_position_offset_models_get_the_sequence_their_table_holds():
    """RoBERTa-style position ids start at padding_idx + 1: a 64-row table with padding id 1 holds 62 tokens
    (the max shape of 64 indexed past the table: IndexError in the reference). BERT's 64 rows hold 64."""
    from exporter.source.families import FAMILIES, resolve_inputs

    text = next(f for f in FAMILIES if f.name == "text-encoder")
    roberta = SimpleNamespace(model_type="roberta", vocab_size=99, max_position_embeddings=64, pad_token_id=1,
                              type_vocab_size=1)
    bert = SimpleNamespace(model_type="bert", vocab_size=99, max_position_embeddings=64, pad_token_id=0,
                           type_vocab_size=2)
    assert resolve_inputs(text, roberta, None)[1]["sequence"].max == 62
    assert resolve_inputs(text, bert, None)[1]["sequence"].max == 64
    real = SimpleNamespace(model_type="xlm-roberta", vocab_size=250002, max_position_embeddings=514, pad_token_id=1)
    assert resolve_inputs(text, real, None)[1]["sequence"].max == 512


def test_an_empty_token_type_table_allows_zeros_only():
    """DeBERTa-v2's default type_vocab_size is 0 (no table; the ids are ignored): the valid range is 0..0,
    not 0..-1, which refused every input."""
    from exporter.source.families import FAMILIES, resolve_inputs

    text = next(f for f in FAMILIES if f.name == "text-encoder")
    config = SimpleNamespace(model_type="deberta-v2", vocab_size=99, max_position_embeddings=64, type_vocab_size=0)
    hints = resolve_inputs(text, config, None)[2]
    assert (hints["token_type_ids"]["low"], hints["token_type_ids"]["high"]) == (0, 1)
