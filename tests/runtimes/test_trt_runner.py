"""runtimes/trt/runner.py and compat.py: which runtime may run which plan, what the runner refuses
before any TensorRT call, and static checks on the TensorRT names the code uses."""

import ast
import json
from pathlib import Path

import numpy as np
import pytest

import runtimes
from runtimes.errors import IncompatibleEngine, MissingDependency, UsageError
from runtimes.manifest import IOSpec, Manifest, Target, TensorSpec, file_sha256
from runtimes.trt import runner as trt_runner
from runtimes.trt.compat import PlanInfo, compatibility_problems, parse_version

TRT_DIR = Path(runtimes.__file__).parent / "trt"
# Python API names TensorRT 11 removed (NVIDIA's 10.x → 11.x migration guide; the research diff of
# the 10.13 stubs against the 11.4.0.106 bindings): the TensorRT code here must use none of them.
REMOVED_IN_TRT11 = {
    "FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS",
    "REJECT_EMPTY_ALGORITHMS", "WEIGHTLESS", "EXPLICIT_BATCH", "int8_calibrator", "set_calibration_profile",
    "get_calibration_profile", "quantization_flags", "set_quantization_flag", "algorithm_selector",
    "platform_has_fast_fp16", "platform_has_fast_int8", "platform_has_tf32", "device_memory_size",
    "get_device_memory_size_for_profile", "create_execution_context_without_device_memory",
    "has_implicit_batch_dimension", "all_shape_inputs_specified", "weight_streaming_budget",
    "minimum_weight_streaming_budget", "supports_model", "parse_with_weight_descriptors", "dynamic_range",
    "set_dynamic_range", "set_output_type", "precision_is_set", "IStreamReader", "IInt8Calibrator",
    "IInt8EntropyCalibrator2", "IAlgorithmSelector", "CalibrationAlgoType", "QuantizationFlag", "get_plugin_creator",
}


def plan(**kw):
    base = dict(tensorrt="10.13.0.35", compute_capability=(9, 0), gpu_name="NVIDIA H200")
    return PlanInfo(**{**base, **kw})


def test_parse_version():
    assert parse_version("10.13.0.35") == (10, 13, 0, 35)
    assert parse_version("11.4.0.106+cuda13") == (11, 4, 0, 106)
    assert parse_version("") == ()


@pytest.mark.parametrize("info, module, version, cc, expected", [
    (plan(), "tensorrt", "10.13.0.35", (9, 0), []),
    (plan(), "tensorrt", "10.13.0.99", (9, 0), []),  # the build number does not matter
    (plan(), "tensorrt", "10.14.1.48", (9, 0), ["not the TensorRT 10.13.0.35 that built it and the plan is not version"]),
    (plan(), "tensorrt", "10.13.0.35", (8, 9), ["built for compute capability 9.0, this GPU has 8.9"]),
    (plan(), "tensorrt_lean", "10.13.0.35", (9, 0), ["runs only plans built --version-compatible"]),
    (plan(version_compatible=True), "tensorrt", "10.15.0.1", (9, 0), []),
    (plan(version_compatible=True), "tensorrt_lean", "11.4.0.106", (9, 0), []),  # TRT 10 VC plans run on 11
    (plan(version_compatible=True), "tensorrt", "10.12.0.1", (9, 0), ["older than the TensorRT 10.13.0.35"]),
    (plan(tensorrt="11.4.0.106", version_compatible=True), "tensorrt", "12.0.0.1", (9, 0),
     ["plans of TensorRT 11 do not run on TensorRT 12"]),
    (plan(version_compatible=True, exclude_lean_runtime=True), "tensorrt_lean", "10.13.0.35", (9, 0), []),
    (plan(version_compatible=True, exclude_lean_runtime=True), "tensorrt_lean", "10.14.0.1", (9, 0),
     ["the plan carries no lean runtime"]),
    (plan(hardware_compat="ampere+"), "tensorrt", "10.13.0.35", (8, 6), []),
    (plan(hardware_compat="ampere+"), "tensorrt", "10.13.0.35", (7, 5), ["Ampere and newer"]),
    (plan(hardware_compat="same-cc"), "tensorrt", "10.13.0.35", (8, 6), ["built for compute capability 9.0"]),
    (plan(tensorrt="11.4.0.106", hardware_compat="ampere+", compute_capability=(7, 5)), "tensorrt", "11.4.0.106",
     (7, 0), ["TensorRT 11 needs compute capability ≥ 7.5", "Ampere and newer"]),
])
def test_compatibility_rules(info, module, version, cc, expected):
    problems = compatibility_problems(info, module, version, cc)
    assert len(problems) == len(expected), problems
    for fragment, problem in zip(expected, problems):
        assert fragment in problem


def test_plan_info_from_the_manifest_target():
    target = Target("trt", "cuda", ["model.plan"], options={"version_compatible": True, "exclude_lean_runtime": True,
                                                             "hardware_compat": "ampere+"},
                    versions={"tensorrt": "10.13.0.35"}, gpu={"name": "NVIDIA A10", "compute_capability": [8, 6]})
    info = PlanInfo.from_target(target)
    assert info == PlanInfo("10.13.0.35", (8, 6), "NVIDIA A10", True, True, "ampere+")
    assert info.runtime_candidates() == ("tensorrt_lean", "tensorrt")
    assert "version-compatible, without the lean runtime, hardware-compatible ampere+" in info.describe()
    assert plan().runtime_candidates() == ("tensorrt",)
    assert "not version- or hardware-compatible" in plan().describe()


def test_bf16_outputs_widen_exactly():
    values = np.array([1.0, -2.5, 3.140625, 0.0, 65280.0], dtype=np.float32)
    raw = (values.view(np.uint32) >> 16).astype(np.uint16)  # these values are exact in bfloat16
    np.testing.assert_array_equal(trt_runner.widen_bf16(raw), values)


def _owner(node: ast.AST) -> str | None:
    """'engine' for engine.x and self.engine.x; likewise context, runtime (self._runtime) and trt."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return node.attr.lstrip("_")
    return None


def test_runtime_api_list_covers_what_the_runner_touches():
    """RUNTIME_API is what bench/gpu/trt_lean_check.py checks against the real lean module, so it
    must name every TensorRT attribute the runner uses."""
    tree = ast.parse((TRT_DIR / "runner.py").read_text())
    owners = {"trt": "module", "engine": "ICudaEngine", "context": "IExecutionContext", "runtime": "Runtime"}
    used: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _owner(node.value) in owners:
            used.setdefault(owners[_owner(node.value)], set()).add(node.attr)
    used["module"] -= {"ILogger"}  # the logger base class, listed with its Severity below
    used["module"] |= {"ILogger"}
    for owner, names in used.items():
        missing = names - set(trt_runner.RUNTIME_API[owner]) - set(trt_runner.FULL_ONLY_API.get(owner, []))
        assert not missing, f"{owner}: {missing} used by runner.py but not in RUNTIME_API"
    assert set(trt_runner.RUNTIME_API["IExecutionContext"]) <= used["IExecutionContext"]


def test_no_api_that_tensorrt_11_removed():
    """mypy checks the code against the TensorRT 10.13 stubs (so nothing newer than 10 is used);
    this checks the other direction, for names that 10 has and 11 no longer has."""
    found = []
    for path in sorted(TRT_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.attr if isinstance(node, ast.Attribute) else None
            if name in REMOVED_IN_TRT11:
                found.append(f"{path.name}:{node.lineno} {name}")
    assert not found


def _fake_trt_bundle(tmp_path: Path, **target_kw) -> Path:
    bundle = tmp_path / "trt-bundle"
    bundle.mkdir()
    (bundle / "model.plan").write_bytes(b"not a real plan")
    manifest = Manifest(
        name="tiny-trt-fp32", source={"spec": "onnx:/x/model.onnx"},
        io=IOSpec([TensorSpec("x", "float32", ("batch", 4))], [TensorSpec("y", "float32", ("batch", 4))]),
        precision={"requested": "fp32"},
        target=Target("trt", "cuda", ["model.plan"], **target_kw),
        build_command=["enginekit", "build", "onnx:/x/model.onnx", "--target", "trt", "-o", "/x/b", "--force"],
        files={"model.plan": file_sha256(bundle / "model.plan")},
    )
    manifest.write(bundle)
    return bundle


def test_loading_without_tensorrt_is_one_paragraph(tmp_path):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except (ImportError, OSError):
        pass
    bundle = _fake_trt_bundle(tmp_path, options={"version_compatible": True}, versions={"tensorrt": "10.13.0.35"})
    with pytest.raises(MissingDependency) as err:
        runtimes.load(bundle)
    text = str(err.value)
    assert "needs the Python module 'tensorrt' or 'tensorrt_lean' (the plan is version-compatible" in text
    assert "enginekit[trt]" in text and "10.13.0.35" in text and "\n" not in text
    with pytest.raises(MissingDependency, match=r"'tensorrt_lean', which .*enginekit\[trt-lean\]"):
        runtimes.load(bundle, trt_runtime="lean")


def test_device_cpu_and_cuda_graphs_on_ort_cpu_are_refused(tmp_path, bert_bundle):
    with pytest.raises(IncompatibleEngine, match="--target ort --device cpu"):
        runtimes.load(_fake_trt_bundle(tmp_path), device="cpu")
    with pytest.raises(UsageError, match="only for a bundle that runs on CUDA, found device 'cpu'"):
        runtimes.load(bert_bundle, cuda_graph=True)
    data = json.loads((bert_bundle / "manifest.json").read_text())
    assert data["target"]["backend"] == "ort"


def test_the_gpu_check_script_reports_as_json_where_it_cannot_pass(tmp_path):
    """bench/gpu/trt_lean_check.py runs on a GPU with the lean wheels; here it must still run to the
    end and report every check (failed ones with their reason) instead of crashing."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu" / "trt_lean_check.py")], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120, env=dict(os.environ, OUT=str(tmp_path)))
    report = json.loads(proc.stdout)
    assert set(report["checks"]) == {"environment", "imports", "api_surface", "runtime_behaviour",
                                     "runner_refuses_a_bad_plan", "cuda_calls"}
    assert proc.returncode == (0 if report["passed"] else 1)
    assert json.loads((tmp_path / "trt_lean_check.json").read_text()) == report


def test_importing_the_tensorrt_backend_imports_neither_tensorrt_nor_cuda():
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = ("import sys, runtimes.trt.build, runtimes.trt.runner, runtimes.trt.cuda, runtimes.trt.compat; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'tensorrt_lean', 'cuda', 'torch')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
