"""The TensorRT build and runner code paths, run on the CPU against stand-ins (tests/runtimes/fake_trt.py).

Neither TensorRT nor a GPU exists where CI runs, so these tests replace `tensorrt`,
`tensorrt_lean` and `cuda.bindings.runtime` with fakes whose "engine" is ONNX Runtime on host
memory. They prove enginekit's own logic (pipeline wiring, flags and profiles handed to the
builder, timing-cache flow, manifest contents, runtime choice, buffers, shapes, CUDA-graph
bookkeeping), not TensorRT's behaviour; tests/runtimes/test_trt.py does that where TensorRT is.
"""

import json

import numpy as np
import onnx
import pytest

import runtimes
from exporter.pipeline import BuildOptions, build, export_model
from runtimes.errors import BuildError, IncompatibleEngine
from runtimes.manifest import DimRange
from runtimes.samples import generate_feeds
from runtimes.trt.build import TrtBuildOptions
from tests.runtimes import fake_trt


@pytest.fixture(scope="module")
def bert_onnx(tiny_bert_dir, tmp_path_factory):
    """The tiny BERT exported once (dims recorded in its metadata); builds here start from it."""
    out = tmp_path_factory.mktemp("trt-fake") / "bert.onnx"
    export_model(f"hf:{tiny_bert_dir}", out, BuildOptions(shapes={"batch": DimRange(1, 2, 4),
                                                                  "sequence": DimRange(1, 16, 32)}))
    return out


def _build(bert_onnx, output, messages=None, **trt):
    opts = BuildOptions(target="trt", output=output, force=True, trt=TrtBuildOptions(**trt))
    return build(f"onnx:{bert_onnx}", opts, messages.append if messages is not None else None)


def test_build_records_the_target_and_the_runner_computes_the_graph(monkeypatch, bert_onnx, tmp_path):
    fakes = fake_trt.install(monkeypatch)
    messages: list[str] = []
    result = _build(bert_onnx, tmp_path / "b", messages, workspace=1 << 30, opt_level=4)
    bundle, m = result.bundle, result.manifest
    assert sorted(p.name for p in bundle.iterdir()) == ["engine_layers.json", "manifest.json", "model.plan",
                                                        "parity.json", "report.html", "timing.cache"]
    network, config = fakes.trt.built[0]
    assert network.flags == 1 << 1  # STRONGLY_TYPED (value 1 in TensorRT 10) requested
    assert fakes.trt.BuilderFlag.TF32 not in config.flags and config.builder_optimization_level == 4
    assert config.profiling_verbosity == fakes.trt.ProfilingVerbosity.DETAILED
    assert config.profiles[0].shapes["input_ids"] == {"min": [1, 1], "opt": [2, 16], "max": [4, 32]}
    t = m.target
    assert (t.backend, t.device, t.engine_files) == ("trt", "cuda", ["model.plan"])
    assert t.versions["tensorrt"] == "10.13.0.35" and t.gpu == {"name": "Fake GPU", "compute_capability": [9, 0]}
    assert t.options["workspace_bytes"] == 1 << 30 and t.options["version_compatible"] is False
    assert t.options["profiles"][0]["attention_mask"]["max"] == [4, 32]
    assert m.precision["realised"]["engine_layers"]["by_output_type"] == {"FP32": len(onnx.load(bert_onnx).graph.node)}
    assert m.parity["status"] == "passed" and "model.plan" in m.files
    assert m.build_command[m.build_command.index("--workspace") + 1] == "1GiB" and "--opt-level" in m.build_command
    assert any(msg.startswith("Building the trt engine (cuda): Building engine [####") for msg in messages)

    import onnxruntime as ort

    session = ort.InferenceSession(str(bert_onnx), providers=["CPUExecutionProvider"])
    with runtimes.load(bundle) as r:
        assert r.module_name == "tensorrt" and r.gpu["name"] == "Fake GPU"
        for point in ("min", "opt", "max", "opt"):
            feeds = generate_feeds(m.io, point, seed=3)
            got = r.infer(feeds)
            want = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
            for name in want:
                np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_tensorrt_11_networks_get_no_creation_flag(monkeypatch, bert_onnx, tmp_path):
    fakes = fake_trt.install(monkeypatch, version="11.4.0.106")
    _build(bert_onnx, tmp_path / "b", tf32=True)
    network, config = fakes.trt.built[0]
    assert network.flags == 0 and fakes.trt.BuilderFlag.TF32 in config.flags


def test_cuda_graph_replay_matches_the_plain_path(monkeypatch, bert_onnx, tmp_path):
    fakes = fake_trt.install(monkeypatch)
    bundle = _build(bert_onnx, tmp_path / "b").bundle
    io = runtimes.Manifest.read(bundle).io
    # opt ×3 (run, replay, replay), max ×2 (run and capture anew, replay), opt (run and capture anew)
    cases = [generate_feeds(io, p, seed=s) for p, s in [("opt", 1), ("opt", 2), ("opt", 3), ("max", 1), ("max", 2),
                                                        ("opt", 4)]]
    with runtimes.load(bundle) as plain, runtimes.load(bundle, cuda_graph=True) as graphed:
        for feeds in cases:
            want, got = plain.infer(feeds), graphed.infer(feeds)
            for name in want:
                np.testing.assert_array_equal(got[name], want[name])
        assert graphed.cuda_graph_error is None and graphed._graph is not None
    assert fakes.cuda.graph_launches == 3
    assert not fakes.cuda.memory  # close() freed every buffer


def test_timing_cache_is_carried_to_the_next_build(monkeypatch, bert_onnx, tmp_path):
    fake_trt.install(monkeypatch)
    out = tmp_path / "b"
    first = _build(bert_onnx, out).manifest.target.options["timing_cache"]
    assert first["loaded_from"] is None and (out / "timing.cache").read_bytes() == b"+tuned"
    second = _build(bert_onnx, out).manifest.target.options["timing_cache"]  # --force over the first
    assert second["loaded_from"] == str(out / "timing.cache") and (out / "timing.cache").read_bytes() == b"+tuned+tuned"
    shared = tmp_path / "caches" / "bert.cache"
    _build(bert_onnx, tmp_path / "c", timing_cache=shared)
    assert shared.read_bytes() == b"+tuned"
    again = _build(bert_onnx, tmp_path / "c", timing_cache=shared).manifest
    assert again.target.options["timing_cache"]["loaded_from"] == str(shared) and shared.read_bytes() == b"+tuned+tuned"
    assert "--timing-cache" in again.build_command
    shared.write_bytes(b"OTHER-GPU cache")
    ignored = _build(bert_onnx, tmp_path / "c", timing_cache=shared).manifest.target.options["timing_cache"]
    assert ignored["loaded_from"] is None and "another GPU or TensorRT version" in ignored["ignored"]


def test_lean_runtime_runs_only_version_compatible_plans(monkeypatch, bert_onnx, tmp_path):
    fakes = fake_trt.install(monkeypatch, lean_version="10.13.0.35")
    vc = _build(bert_onnx, tmp_path / "vc", version_compatible=True, exclude_lean_runtime=True).bundle
    # The build's inspector opened the lean-less plan through the full module plus the lean library.
    assert fakes.trt.lean_libraries_loaded == ["libnvinfer_lean.so.10"]
    plain = _build(bert_onnx, tmp_path / "plain").bundle
    feeds = generate_feeds(runtimes.Manifest.read(vc).io, "opt")
    with runtimes.load(vc) as r:  # excluded lean runtime: the lean module is tried first
        assert r.module_name == "tensorrt_lean"
        expected = r.infer(feeds)
    with pytest.raises(IncompatibleEngine) as err:
        runtimes.load(plain, trt_runtime="lean")
    assert "runs only plans built --version-compatible" in str(err.value) and "--target trt" in str(err.value)
    fake_trt.install(monkeypatch, lean_version="10.13.0.35", full=False)  # an edge box with the lean wheel only
    with runtimes.load(vc) as r:
        got = r.infer(feeds)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


def test_plans_from_another_tensorrt_or_gpu_are_refused_before_deserializing(monkeypatch, bert_onnx, tmp_path):
    fake_trt.install(monkeypatch)
    bundle = _build(bert_onnx, tmp_path / "b").bundle
    fake_trt.install(monkeypatch, version="10.14.1.48", cc=(8, 6))
    with pytest.raises(IncompatibleEngine) as err:
        runtimes.load(bundle)
    text = str(err.value)
    assert "built with TensorRT 10.13.0.35 on Fake GPU (compute capability 9.0)" in text
    assert "built for compute capability 9.0, this GPU has 8.6" in text
    assert "enginekit build onnx:" in text and "--version-compatible" in text and "\n" not in text


def test_parser_errors_name_the_nodes(monkeypatch, tmp_path):
    fake_trt.install(monkeypatch)
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])
    nodes = [onnx.helper.make_node("Relu", ["x"], ["r"], name="/relu"),
             onnx.helper.make_node("Mystery", ["r"], ["y"], name="/block/mystery", domain=fake_trt.UNSUPPORTED_DOMAIN)]
    model = onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", [x], [y]),
                                   opset_imports=[onnx.helper.make_opsetid("", 18),
                                                  onnx.helper.make_opsetid(fake_trt.UNSUPPORTED_DOMAIN, 1)])
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(BuildError) as err:
        build(f"onnx:{tmp_path / 'm.onnx'}", BuildOptions(target="trt", output=tmp_path / "b",
                                                          shapes={"batch": DimRange(1, 2, 8)}))
    assert "node 1 '/block/mystery' (Mystery): UNSUPPORTED_NODE" in str(err.value)
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.partial*"))


def test_no_gpu_hands_the_build_over(monkeypatch, bert_onnx, tmp_path):
    fakes = fake_trt.install(monkeypatch)
    fakes.cuda.devices = 0
    with pytest.raises(runtimes.MissingDependency) as err:
        _build(bert_onnx, tmp_path / "b")
    assert "no CUDA GPU is usable" in str(err.value) and (tmp_path / "b.lowered" / "model.onnx").is_file()
    meta = {p.key: p.value for p in onnx.load(tmp_path / "b.lowered" / "model.onnx").metadata_props}
    assert json.loads(meta["enginekit.dims"])["sequence"] == {"min": 1, "opt": 16, "max": 32}
