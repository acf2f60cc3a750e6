"""`build --target trt` where TensorRT is missing (this CPU machine): export and lowering are kept
beside the output, and the printed command finishes the build from them on a TensorRT machine."""

import json
import shlex

import numpy as np
import onnx
import pytest

from exporter.build.handoff import keep_lowered
from exporter.pipeline import BuildOptions, build
from exporter.source.loading import load_source
from exporter.source.spec import parse_source
from runtimes.errors import MissingDependency, SourceError, UsageError
from runtimes.manifest import DimRange, IOSpec, TensorSpec
from runtimes.trt.build import tensorrt_unavailable
from tests.conftest import run_cli


@pytest.fixture(autouse=True)
def _without_tensorrt():
    if tensorrt_unavailable() is None:
        pytest.skip("TensorRT and a GPU are here: the build would not stop")


@pytest.mark.slow
def test_cli_keeps_the_lowered_onnx_and_its_finishing_command_works(tiny_bert_dir, tmp_path):
    out = tmp_path / "engines" / "bert-trt"
    proc = run_cli("build", f"hf:{tiny_bert_dir}", "--target", "trt", "--shapes", "batch=1:2:4,sequence=1:16:32",
                   "--workspace", "256MiB", "-o", str(out))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr  # one paragraph, on one line
    kept = tmp_path / "engines" / "bert-trt.lowered" / "model.onnx"
    assert kept.is_file() and f"kept at '{kept}'" in errors[0] and "enginekit[trt]" in errors[0]
    assert "'tensorrt' cannot be imported" in errors[0]
    assert not out.exists() and not list(out.parent.glob(".*partial*"))
    finish = shlex.split(errors[0].split("finish the build there with: ", 1)[1])
    assert finish[:3] == ["enginekit", "build", f"onnx:{kept}"]
    assert " ".join(finish[3:]).startswith("--target trt --device cuda --precision fp32 --shapes batch=1:2:4,sequence=1:16:32")
    assert finish[-5:] == ["--workspace", "256MiB", "-o", str(out), "--force"]

    # Run here, the finishing command gets past the source, its dims and the lowering, and stops
    # at the same place, naming the same kept ONNX and the same command.
    again = run_cli(*finish[1:])
    assert again.returncode == 2 and "✓ Lowering precision to fp32" in again.stderr
    assert [line for line in again.stderr.splitlines() if line.startswith("error:")] == errors

    # The kept ONNX is a complete source: the same command with ONNX Runtime builds and passes the gate.
    ort = [a for a in finish[1:] if a not in ("--workspace", "256MiB")]
    ort[ort.index("--target") + 1], ort[ort.index("--device") + 1] = "ort", "cpu"
    ort[ort.index("-o") + 1] = str(tmp_path / "engines" / "bert-ort")
    done = run_cli(*ort, "--json")
    assert done.returncode == 0, done.stderr
    manifest = json.loads(done.stdout)["manifest"]
    assert json.loads(done.stdout)["parity"]["status"] == "passed"
    assert manifest["io"]["dims"]["sequence"] == {"min": 1, "opt": 16, "max": 32}
    assert "lowered" not in manifest["source"]  # an FP32 graph is not marked lowered: any precision may follow


def _onnx_with_external_data(path, scale: float = 2.0):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 256])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 256])
    w = onnx.numpy_helper.from_array(np.full((256,), scale, np.float32), "w")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Mul", ["x", "w"], ["y"], name="/mul")], "g", [x], [y], [w])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=10)
    model.metadata_props.add(key="author", value="test")
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    return path


def test_kept_folder_holds_weights_metadata_and_the_reference(tmp_path):
    lowered = _onnx_with_external_data(tmp_path / "low.onnx", 3.0)
    reference = _onnx_with_external_data(tmp_path / "ref.onnx", 2.0)
    io = IOSpec([TensorSpec("x", "float32", ("batch", 256))], [TensorSpec("y", "float32", ("batch", 256))],
                dims={"batch": DimRange(1, 2, 8)}, values={"x": {"kind": "uniform"}})
    dest = tmp_path / "out.lowered"
    dest.mkdir()
    (dest / "stale.txt").write_text("from an earlier build")
    kept = keep_lowered(lowered, reference, io, "fp16", dest)
    assert sorted(p.name for p in dest.rglob("*")) == ["low.onnx.data", "model.onnx", "model.onnx", "ref.onnx.data",
                                                       "reference"]
    assert not list(tmp_path.glob(".out.lowered*"))
    model = onnx.load(str(kept))  # loads the external weights from beside the kept file
    assert onnx.numpy_helper.to_array(model.graph.initializer[0])[0] == 3.0
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["author"] == "test" and meta["enginekit.lowered"] == "fp16"
    assert meta["enginekit.reference"] == "reference/model.onnx"
    assert json.loads(meta["enginekit.dims"]) == {"batch": {"min": 1, "opt": 2, "max": 8}}
    loaded = load_source(parse_source(f"onnx:{kept}"))
    assert loaded.reference_onnx == dest / "reference" / "model.onnx" and loaded.io.values == {"x": {"kind": "uniform"}}
    assert loaded.info["lowered"] == "fp16" and loaded.io.dims == {"batch": DimRange(1, 2, 8)}
    feeds = {"x": np.ones((2, 256), np.float32)}
    assert loaded.reference(feeds)["y"][0, 0] == 2.0  # the gate's reference is the FP32 graph, not the kept one
    (dest / "reference" / "model.onnx").unlink()
    with pytest.raises(SourceError, match="copy the whole folder|Copy the whole folder"):
        load_source(parse_source(f"onnx:{kept}"))


def test_an_already_lowered_onnx_is_not_lowered_again(tmp_path):
    kept = keep_lowered(_onnx_with_external_data(tmp_path / "m.onnx"), None,
                        IOSpec([], [], dims={"batch": DimRange(1, 2, 8)}), "fp16", tmp_path / "b.lowered")
    with pytest.raises(UsageError, match="already lowered to fp16"):
        build(f"onnx:{kept}", BuildOptions(target="trt", precision="fp32", output=tmp_path / "b"))
    # fp16 lowering is not in this enginekit yet; the kept graph skips it and reaches TensorRT
    with pytest.raises(MissingDependency, match="TensorRT"):
        build(f"onnx:{kept}", BuildOptions(target="trt", precision="fp16", output=tmp_path / "b"))
