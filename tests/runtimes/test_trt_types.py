"""Static types of runtimes/trt against the TensorRT stubs vendored in typings/ (TensorRT itself
cannot be installed where CI runs). The configuration is [tool.mypy] in pyproject.toml."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _mypy(tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    pytest.importorskip("mypy")
    return subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy-cache"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_the_tensorrt_layer_type_checks_strictly(tmp_path):
    proc = _mypy(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success: no issues found in 5 source files" in proc.stdout


def test_the_stubs_are_really_used(tmp_path):
    """A wrong TensorRT call must fail: proves the stubs are found, not silently treated as Any."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import tensorrt as trt\n"
        "import tensorrt_lean\n"
        "flag = trt.BuilderFlag.NO_SUCH_FLAG\n"
        "def f(e: trt.ICudaEngine) -> None:\n"
        "    e.execute_async_v9(0)\n"
        "builder = tensorrt_lean.Builder\n"  # the lean runtime has no builder
    )
    proc = _mypy(tmp_path, "--config-file", str(ROOT / "pyproject.toml"), str(probe))
    assert proc.returncode == 1
    for expected in ('"type[BuilderFlag]" has no attribute "NO_SUCH_FLAG"', '"ICudaEngine" has no attribute',
                     'probe.py:6: error: Module has no attribute "Builder"'):
        assert expected in proc.stdout, proc.stdout
