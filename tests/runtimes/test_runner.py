"""The thin runtime: loading checks and input validation, on a real tiny BERT bundle."""

import json
import shutil

import numpy as np
import pytest

import runtimes
from runtimes.errors import IncompatibleEngine, InvalidInput
from runtimes.samples import generate_feeds


def _copy(bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(bundle, dst)
    return dst


def _edit_manifest(bundle, fn):
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_specs_and_inference(bert_bundle):
    with runtimes.load(bert_bundle) as r:
        assert [s.name for s in r.input_specs()] == ["input_ids", "attention_mask", "token_type_ids"]
        assert [s.name for s in r.output_specs()] == ["last_hidden_state", "pooler_output"]
        out = r.infer(generate_feeds(r.manifest.io, "opt"))
        assert out["last_hidden_state"].shape == (4, 64, 32) and out["pooler_output"].shape == (4, 32)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda f: f.pop("attention_mask"), "missing input"),
        (lambda f: f.update(extra=np.zeros(1)), "unexpected input"),
        (lambda f: f.update(input_ids=f["input_ids"].astype(np.int32)), "dtype int32, expected int64"),
        (lambda f: f.update(input_ids=f["input_ids"][0]), "rank 1"),
        (lambda f: f.update({k: np.ones((2, 65), np.int64) for k in f}), "outside the built range 1..64"),
        (lambda f: f.update({k: np.ones((17, 8), np.int64) for k in f}), "outside the built range 1..16"),
        (lambda f: f.update(attention_mask=np.ones((3, 8), np.int64)), "inputs sharing a dim must agree"),
    ],
)
def test_bad_inputs_are_refused_before_the_backend(bert_bundle, mutate, message):
    feeds = {k: np.ones((2, 8), np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    mutate(feeds)
    with runtimes.load(bert_bundle) as r, pytest.raises(InvalidInput, match=message):
        r.infer(feeds)


def test_every_problem_is_reported_at_once(bert_bundle):
    feeds = {"input_ids": np.ones((2, 8), np.int32), "token_type_ids": np.ones(3, np.int64)}
    with runtimes.load(bert_bundle) as r, pytest.raises(InvalidInput) as err:
        r.infer(feeds)
    text = str(err.value)
    assert "missing input(s) ['attention_mask']" in text and "int32" in text and "rank 1" in text


def test_altered_model_file_is_refused_with_the_rebuild_command(bert_bundle, tmp_path):
    b = _copy(bert_bundle, tmp_path)
    with open(b / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(IncompatibleEngine, match="modified after the build") as err:
        runtimes.load(b)
    assert "enginekit build hf:" in str(err.value) and "--force" in str(err.value)
    (b / "model.onnx").unlink()
    with pytest.raises(IncompatibleEngine, match="model.onnx is missing"):
        runtimes.load(b)


def test_missing_provider_is_refused(bert_bundle, tmp_path):
    b = _copy(bert_bundle, tmp_path)
    _edit_manifest(b, lambda d: d["target"].update(device="cuda", providers=["CUDAExecutionProvider"]))
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    with pytest.raises(IncompatibleEngine, match="CUDAExecutionProvider"):
        runtimes.load(b)
    with runtimes.load(b, device="cpu") as r:  # the same graph still runs on the CPU provider
        assert r.providers == ["CPUExecutionProvider"]


def test_cuda_graph_argument_reaches_the_ort_runner(bert_bundle, clip_bundle, tmp_path):
    """cuda_graph=True is for ORT CUDA bundles (and TensorRT): on an ORT CUDA bundle it must reach the
    ORT runner (here: its provider check), not be refused up front as it was at 2026-12-01's HEAD."""
    from runtimes.errors import UsageError

    b = _copy(bert_bundle, tmp_path)
    _edit_manifest(b, lambda d: d["target"].update(device="cuda", providers=["CUDAExecutionProvider"]))
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(IncompatibleEngine, match="CUDAExecutionProvider"):
            runtimes.load(b, cuda_graph=True)
    with pytest.raises(UsageError, match="found device 'cpu'"):
        runtimes.load(b, device="cpu", cuda_graph=True)
    with pytest.raises(UsageError, match="only for a bundle that runs on CUDA"):
        runtimes.load(bert_bundle, cuda_graph=True)
    with pytest.raises(UsageError, match="only for a bundle that runs on CUDA"):  # each tower's runner decides
        runtimes.load(clip_bundle, cuda_graph=True)


@pytest.mark.gpu
def test_cuda_graph_replay_equals_the_plain_cuda_path(tiny_bert_dir, tmp_path):
    from exporter.pipeline import BuildOptions, build

    bundle = build(f"hf:{tiny_bert_dir}", BuildOptions(output=tmp_path / "cuda", device="cuda")).bundle
    with runtimes.load(bundle) as plain, runtimes.load(bundle, cuda_graph=True) as graphed:
        for batch in (1, 3):
            feeds = generate_feeds(plain.manifest.io, {"batch": batch, "sequence": 16}, seed=batch)
            want = plain.infer(feeds)
            for _ in range(3):  # capture, then replays into the same buffers
                got = graphed.infer(feeds)
            for name, value in want.items():
                np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5)


def test_other_major_onnxruntime_is_refused(bert_bundle, tmp_path):
    b = _copy(bert_bundle, tmp_path)
    _edit_manifest(b, lambda d: d["target"]["versions"].update(onnxruntime="0.9.0"))
    with pytest.raises(IncompatibleEngine, match=r"Expected ONNX Runtime 0\.x"):
        runtimes.load(b)


def test_unknown_schema_or_broken_manifest_is_refused(bert_bundle, tmp_path):
    b = _copy(bert_bundle, tmp_path)
    _edit_manifest(b, lambda d: d.update(schema_version=99))
    with pytest.raises(IncompatibleEngine, match="schema 1, found 99"):
        runtimes.load(b)
    (b / "manifest.json").write_text("{")
    with pytest.raises(IncompatibleEngine, match="cannot be parsed"):
        runtimes.load(b)
    (b / "manifest.json").unlink()
    with pytest.raises(IncompatibleEngine, match="has none"):
        runtimes.load(b)
    with pytest.raises(IncompatibleEngine, match="does not exist"):
        runtimes.load(tmp_path / "nope")


def test_threads_setting_is_applied(bert_bundle):
    with runtimes.load(bert_bundle, threads=1) as r:
        assert r.threads == 1
        assert r.session.get_session_options().intra_op_num_threads == 1


def test_values_the_engine_refuses_are_invalid_input(bert_bundle):
    """A token id beyond the vocabulary passes the shape checks and is refused by the recorded range;
    without a recorded range (an onnx: model with no hint), ORT's own refusal comes back as InvalidInput."""
    with runtimes.load(bert_bundle) as r:
        feeds = generate_feeds(r.manifest.io, "min")
        feeds["input_ids"] = feeds["input_ids"] + 10_000
        with pytest.raises(InvalidInput, match="outside the valid range 0"):
            r.infer(feeds)
        del r.manifest.io.values["input_ids"]
        with pytest.raises(InvalidInput, match="ONNX Runtime refused them: .*Gather"):
            r.infer(feeds)
