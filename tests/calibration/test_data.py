"""Data sources for the gate: npz files and folders, text and JSONL through the model's tokenizer."""

import json

import numpy as np
import pytest

from calibration.data import load_feeds
from runtimes.errors import DataError
from runtimes.manifest import DimRange, IOSpec, TensorSpec

IO = IOSpec(
    inputs=[TensorSpec("input_ids", "int64", ("batch", "sequence")),
            TensorSpec("attention_mask", "int64", ("batch", "sequence")),
            TensorSpec("token_type_ids", "int64", ("batch", "sequence"))],
    outputs=[],
    dims={"batch": DimRange(1, 4, 16), "sequence": DimRange(1, 8, 12)},
)


def _feed(n=2, s=5):
    return {"input_ids": np.ones((n, s), np.int64), "attention_mask": np.ones((n, s), np.int64),
            "token_type_ids": np.zeros((n, s), np.int64)}


def test_npz_file_and_folder(tmp_path):
    np.savez(tmp_path / "a.npz", **_feed())
    (tmp_path / "many").mkdir()
    for i in range(3):
        np.savez(tmp_path / "many" / f"{i}.npz", **_feed(n=i + 1))
    assert len(load_feeds(tmp_path / "a.npz", IO)) == 1
    feeds = load_feeds(tmp_path / "many", IO)
    assert [f["input_ids"].shape[0] for f in feeds] == [1, 2, 3]


def test_npz_int32_is_cast_to_the_engine_dtype(tmp_path):
    f = {k: v.astype(np.int32) for k, v in _feed().items()}
    np.savez(tmp_path / "a.npz", **f)
    assert load_feeds(tmp_path / "a.npz", IO)[0]["input_ids"].dtype == np.int64


def test_text_and_jsonl_are_tokenized_and_truncated(tmp_path, tiny_bert_dir):
    txt = tmp_path / "s.txt"
    txt.write_text("the cat sat on the mat\n\nthe dog runs here and there and there and there and there\n")
    feeds = load_feeds(txt, IO, tokenizer_dir=tiny_bert_dir, batch_size=8)
    assert len(feeds) == 1 and feeds[0]["input_ids"].shape == (2, 12)  # truncated at the max sequence
    assert feeds[0]["input_ids"][0, 0] == 2  # [CLS]
    jl = tmp_path / "s.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t}) for t in ["a cat", "a dog", "the mat"]) + "\n")
    feeds = load_feeds(jl, IO, tokenizer_dir=tiny_bert_dir, batch_size=2)
    assert [f["input_ids"].shape[0] for f in feeds] == [2, 1]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing.npz", "found nothing"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "found none"),
        (lambda p: (p / "bad.npz").write_bytes(b"not a zip") and p / "bad.npz", "cannot be read"),
        (lambda p: np.savez(p / "wrong.npz", ids=np.ones((1, 2))) or p / "wrong.npz", "missing"),
        (lambda p: (p / "e.txt").write_text("\n\n") and p / "e.txt", "at least one text"),
        (lambda p: (p / "b.jsonl").write_text("{not json}\n") and p / "b.jsonl", "not JSON"),
        (lambda p: (p / "c.jsonl").write_text('{"t": 1}\n') and p / "c.jsonl", '"text"'),
        (lambda p: (p / "x.csv").write_text("a") and p / "x.csv", ".npz file"),
        (lambda p: (p / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1")) and p / "latin1.txt",
         "byte 3 is not valid UTF-8"),
        (lambda p: (p / "l.jsonl").write_bytes(b'{"text": "\xff"}\n') and p / "l.jsonl", "not valid UTF-8"),
    ],
)
def test_bad_data_is_a_clear_error(tmp_path, tiny_bert_dir, make, message):
    with pytest.raises(DataError, match=message):
        load_feeds(make(tmp_path), IO, tokenizer_dir=tiny_bert_dir)


def test_text_without_a_tokenizer_is_a_clear_error(tmp_path):
    txt = tmp_path / "s.txt"
    txt.write_text("hello\n")
    with pytest.raises(DataError, match="tokenizer"):
        load_feeds(txt, IO, tokenizer_dir=None)
