"""TensorRT for real: build plans with the installed TensorRT on this machine's GPU, gate them, and
run them with the thin runtime (full and lean). Marked `trt`: skipped where TensorRT,
cuda-bindings or an NVIDIA GPU is missing, which is everywhere this project's CI runs; so these
tests have not run yet (see the README's "What is verified where")."""

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest

import runtimes
from exporter.pipeline import BuildOptions, build
from runtimes.errors import BuildError, IncompatibleEngine
from runtimes.manifest import DimRange
from runtimes.samples import generate_feeds
from runtimes.trt.build import TrtBuildOptions
from tests.conftest import ROOT

pytestmark = pytest.mark.trt
SHAPES = {"batch": DimRange(1, 2, 4), "sequence": DimRange(1, 16, 32)}


@pytest.fixture(scope="module")
def trt_bert(tiny_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "bert-trt-fp32"
    return build(f"hf:{tiny_bert_dir}", BuildOptions(target="trt", shapes=SHAPES, output=out))


def _conv(output, **trt):
    return build("py:tests.models.convnet:make", BuildOptions(target="trt", output=output, force=True,
                                                                trt=TrtBuildOptions(**trt)))


def test_bert_plan_passes_the_gate_and_records_what_it_is(trt_bert):
    import tensorrt

    m, bundle = trt_bert.manifest, trt_bert.bundle
    assert trt_bert.parity.status == "passed", trt_bert.parity.summary()
    assert (m.target.backend, m.target.device, m.target.engine_files) == ("trt", "cuda", ["model.plan"])
    assert m.target.versions["tensorrt"] == tensorrt.__version__ and len(m.target.gpu["compute_capability"]) == 2
    assert m.target.options["profiles"][0]["input_ids"] == {"min": [1, 1], "opt": [2, 16], "max": [4, 32]}
    assert (bundle / "timing.cache").stat().st_size > 0 and (bundle / "model.plan").stat().st_size > 0
    layers = m.precision["realised"]["engine_layers"]
    assert layers["available"] and layers["layers"] > 0
    json.loads((bundle / "engine_layers.json").read_text())
    # A strongly typed FP32 graph with TF32 off computes in FP32: no layer may have picked FP16.
    assert "FP16" not in layers["by_output_type"] and "FP32" in layers["by_output_type"], layers


def test_thin_runtime_runs_the_plan_without_torch(trt_bert):
    code = textwrap.dedent(f"""
        import sys
        import runtimes
        from runtimes.samples import generate_feeds
        with runtimes.load({str(trt_bert.bundle)!r}) as r:
            out = r.infer(generate_feeds(r.manifest.io, "max"))
        assert out["last_hidden_state"].shape == (4, 32, 32), out["last_hidden_state"].shape
        print("HEAVY:", [m for m in ("torch", "transformers", "exporter", "polygraphy") if m in sys.modules])
        print("TRT:", "tensorrt" in sys.modules)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "HEAVY: []" in proc.stdout and "TRT: True" in proc.stdout


def test_cuda_graph_replay_equals_the_plain_path(trt_bert):
    io = trt_bert.manifest.io
    cases = [generate_feeds(io, p, seed=s) for p, s in [("opt", 1), ("opt", 2), ("opt", 3), ("max", 1), ("max", 2),
                                                        ("opt", 4)]]
    with runtimes.load(trt_bert.bundle) as plain, runtimes.load(trt_bert.bundle, cuda_graph=True) as graphed:
        for feeds in cases:
            want, got = plain.infer(feeds), graphed.infer(feeds)
            for name in want:
                np.testing.assert_array_equal(got[name], want[name])
        assert graphed.cuda_graph_error is None and graphed._graph is not None


def test_conv_net_and_its_timing_cache_on_the_next_build(tmp_path):
    first = _conv(tmp_path / "conv", workspace=256 << 20, opt_level=2)
    assert first.parity.status == "passed" and first.manifest.target.options["timing_cache"]["loaded_from"] is None
    second = _conv(tmp_path / "conv", workspace=256 << 20, opt_level=2)
    assert second.manifest.target.options["timing_cache"]["loaded_from"] == str(tmp_path / "conv" / "timing.cache")
    assert second.manifest.target.options["workspace_bytes"] == 256 << 20


def test_lean_runtime_runs_a_version_compatible_plan(tmp_path):
    try:
        import tensorrt_lean
    except (ImportError, OSError):
        pytest.skip("tensorrt_lean is not installed here")
    import tensorrt

    if tensorrt_lean.__version__ != tensorrt.__version__:
        pytest.skip(f"tensorrt_lean {tensorrt_lean.__version__} is not tensorrt {tensorrt.__version__}")
    for exclude in (False, True):
        bundle = _conv(tmp_path / f"vc-{exclude}", version_compatible=True, exclude_lean_runtime=exclude).bundle
        feeds = generate_feeds(runtimes.Manifest.read(bundle).io, "opt", seed=5)
        with runtimes.load(bundle, trt_runtime="lean") as lean:
            assert lean.module_name == "tensorrt_lean"
            got = lean.infer(feeds)
        with runtimes.load(bundle, trt_runtime="full") as full:
            want = full.infer(feeds)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
    plain = _conv(tmp_path / "plain").bundle
    with pytest.raises(IncompatibleEngine, match="--version-compatible"):
        runtimes.load(plain, trt_runtime="lean")


def test_a_plan_from_another_tensorrt_is_refused_with_the_rebuild_command(trt_bert, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(trt_bert.bundle, bundle)
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    data["target"]["versions"]["tensorrt"] = "9.0.0.0"
    path.write_text(json.dumps(data))
    with pytest.raises(IncompatibleEngine) as err:
        runtimes.load(bundle)
    assert "not the TensorRT 9.0.0.0 that built it" in str(err.value)
    assert "enginekit build hf:" in str(err.value) and "--target trt" in str(err.value)


def test_parser_errors_name_the_node(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])
    nodes = [onnx.helper.make_node("Relu", ["x"], ["r"], name="/relu"),
             onnx.helper.make_node("Mystery", ["r"], ["y"], name="/block/mystery", domain="com.example")]
    model = onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", [x], [y]), ir_version=10,
                                   opset_imports=[onnx.helper.make_opsetid("", 18),
                                                  onnx.helper.make_opsetid("com.example", 1)])
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(BuildError) as err:
        build(f"onnx:{tmp_path / 'm.onnx'}", BuildOptions(target="trt", output=tmp_path / "b",
                                                          shapes={"batch": DimRange(1, 2, 8)}))
    assert "'/block/mystery' (Mystery)" in str(err.value)
    assert not (tmp_path / "b").exists()
