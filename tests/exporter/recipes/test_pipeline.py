"""End to end on the CPU: export → build (ORT) → parity gate → thin runtime equals torch.

Each family's tiny model, plus all-MiniLM-L6-v2 with its real weights and real sentences.
"""

import json
from pathlib import Path

import numpy as np
import pytest

import runtimes
from exporter.pipeline import BuildOptions, build
from exporter.source.loading import load_source
from exporter.source.shapes import parse_shapes
from exporter.source.spec import parse_source
from runtimes.errors import BuildError, ParityError, UsageError
from runtimes.samples import generate_feeds
from tests.conftest import MODELS, ROOT

SENTENCES = ROOT / "exporter" / "data" / "sentences.txt"


def _check_bundle_equals_torch(bundle: Path, source: str, points=("min", "opt", "max")):
    """Load the bundle with the thin runtime and compare with a fresh torch reference."""
    ref = load_source(parse_source(source))
    with runtimes.load(bundle) as r:
        ref.io = r.manifest.io
        for i, point in enumerate(points):
            feeds = generate_feeds(r.manifest.io, point, seed=100 + i)
            got, want = r.infer(feeds), ref.reference(feeds)
            assert list(got) == list(want)
            for name in want:
                np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-4, err_msg=f"{point}/{name}")


def _manifest(bundle):
    return json.loads((bundle / "manifest.json").read_text())


def test_bert_like_encoder(bert_bundle, tiny_bert_dir):
    m = _manifest(bert_bundle)
    assert m["parity"]["status"] == "passed" and len(m["parity"]["cases"]) == 3
    assert m["io"]["dims"] == {"batch": {"min": 1, "opt": 4, "max": 16}, "sequence": {"min": 1, "opt": 64, "max": 64}}
    assert m["source"]["exporter"] == "torch.onnx.export (dynamo)" and m["target"]["versions"]["onnxruntime"]
    assert set(m["files"]) == {"model.onnx"} and (bert_bundle / "report.html").is_file()
    # ORT's transformer fusions were applied to the engine (and the gate passed on the fused graph)
    assert {"Attention", "SkipLayerNormalization"} <= set(m["target"]["options"]["fusions"]["fused_ops"])
    parity = json.loads((bert_bundle / "parity.json").read_text())
    assert parity["status"] == "passed" and all(o["passed"] for c in parity["cases"] for o in c["outputs"])
    _check_bundle_equals_torch(bert_bundle, f"hf:{tiny_bert_dir}")


def test_clip_both_towers(clip_bundle, tiny_clip_dir):
    # Two engines (exporter/recipes/zeroshot.py); the bundle as a whole still computes what CLIPModel computes.
    m = runtimes.Manifest.read(clip_bundle)
    assert m.target.backend == "zero-shot" and set(m.files) == {"image/manifest.json", "text/manifest.json"}
    assert [s.name for s in m.io.inputs] == ["input_ids", "attention_mask", "pixel_values"]
    assert set(m.io.dims) == {"text_batch", "sequence", "image_batch"}
    assert {o.name: o.shape for o in m.io.outputs}["logits_per_image"] == ("image_batch", "text_batch")
    assert m.parity["worst"]["logits_per_image"]["argmax"] == 1.0 and m.parity["checks"]["zero-shot"]["top1"] == 1.0
    _check_bundle_equals_torch(clip_bundle, f"hf:{tiny_clip_dir}")


def test_small_conv_net_from_py_factory(bundles):
    src = f"py:{MODELS / 'convnet.py'}:make"
    res = build(src, BuildOptions(output=bundles / "conv"))
    assert res.parity.passed and res.manifest.io.dims["batch"].max == 16
    _check_bundle_equals_torch(res.bundle, src)


def test_two_independent_batch_dims(bundles):
    src = f"py:{MODELS / 'convnet.py'}:make_two_heads"
    res = build(src, BuildOptions(output=bundles / "two"))
    assert {o.name: o.shape for o in res.manifest.io.outputs}["similarity"] == ("x_batch", "y_batch")
    with runtimes.load(res.bundle) as r:
        out = r.infer({"x": np.ones((2, 8), np.float32), "y": np.ones((7, 6), np.float32)})
        assert out["similarity"].shape == (2, 7)


def test_onnx_source_gates_against_the_fp32_onnx(tiny_bert_dir, tmp_path):
    from exporter.pipeline import export_model

    onnx_path = tmp_path / "bert.onnx"
    export_model(f"hf:{tiny_bert_dir}", onnx_path, BuildOptions())
    res = build(f"onnx:{onnx_path}", BuildOptions(output=tmp_path / "from-onnx"))
    # the ranges recorded by `export` come back; values stay within the vocabulary
    assert res.manifest.io.dims["sequence"].max == 64 and res.manifest.io.values["input_ids"]["high"] == 100
    assert res.parity.passed and res.manifest.source["exporter"].startswith("none")


def test_onnx_source_without_dim_ranges_asks_for_them(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "width"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "width"])],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    with pytest.raises(UsageError, match=r"\['width'\].*--shapes width="):
        build(f"onnx:{path}", BuildOptions(output=tmp_path / "r"))
    res = build(f"onnx:{path}", BuildOptions(output=tmp_path / "r", shapes=parse_shapes("width=1:8:32")))
    assert res.parity.passed and len(res.parity.cases) == 3


@pytest.mark.slow
def test_real_weights_minilm_with_real_sentences(minilm_dir, bundles):
    res = build(f"hf:{minilm_dir}", BuildOptions(output=bundles / "minilm", data=SENTENCES,
                                                  shapes=parse_shapes("batch=1:8:8,sequence=1:64:128")))
    assert res.parity.passed
    assert [c.label for c in res.parity.cases][:6] == [f"data[{i}]" for i in range(6)]
    assert res.manifest.source["task"] == "sentence-embedding"
    worst = res.parity.worst()["sentence_embedding"]
    assert worst["cosine"] > 0.99999 and worst["rel_l2"] < 1e-4
    # The engine ranks paraphrases like the torch model: each sentence's nearest neighbour is its pair.
    from calibration.data import load_feeds

    feeds = load_feeds(SENTENCES, res.manifest.io, tokenizer_dir=minilm_dir, batch_size=8)
    with runtimes.load(res.bundle) as r:
        emb = np.concatenate([r.infer(f)["sentence_embedding"] for f in feeds])
    sim = emb @ emb.T
    np.fill_diagonal(sim, -1)
    assert np.mean(sim.argmax(1) == (np.arange(len(emb)) ^ 1)) == 1.0


def test_parity_failure_publishes_nothing_and_keeps_the_evidence(tmp_path):
    out = tmp_path / "noisy"
    with pytest.raises(ParityError) as err:
        build(f"py:{MODELS / 'convnet.py'}:make_noisy", BuildOptions(output=out))
    assert not out.exists()
    rejected = tmp_path / "noisy.rejected"
    assert (rejected / "report.html").is_file() and "noisy.rejected" in str(err.value)
    assert json.loads((rejected / "parity.json").read_text())["status"] == "failed"
    assert "output" in str(err.value) and "rel_l2" in str(err.value)
    assert not list(tmp_path.glob(".*partial*"))


def test_existing_bundle_needs_force_and_force_replaces_atomically(bert_bundle, tiny_bert_dir, tmp_path):
    import shutil

    out = tmp_path / "b"
    shutil.copytree(bert_bundle, out)
    before = (out / "manifest.json").read_text()
    with pytest.raises(BuildError, match="--force"):
        build(f"hf:{tiny_bert_dir}", BuildOptions(output=out))
    assert (out / "manifest.json").read_text() == before
    res = build(f"hf:{tiny_bert_dir}", BuildOptions(output=out, force=True, dynamic=["batch"]))
    assert res.manifest.io.dims["sequence"].min == 64  # fixed at opt now
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


@pytest.mark.parametrize("kw, message", [({"precision": "fp12"}, "--precision"), ({"target": "tpu"}, "--target"),
                                         ({"device": "npu"}, "--device")])
def test_unknown_option_values(tiny_bert_dir, tmp_path, kw, message):
    with pytest.raises(UsageError, match=message):
        build(f"hf:{tiny_bert_dir}", BuildOptions(output=tmp_path / "x", **kw))
    assert not (tmp_path / "x").exists()
