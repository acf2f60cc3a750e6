"""The project's own lint rules (ruff, configured in pyproject.toml) hold over the whole tree."""

import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def test_ruff_clean():
    ruff = shutil.which("ruff", path=str(ROOT / ".venv" / "bin")) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (it is in the dev extra)")
    proc = subprocess.run([ruff, "check", "exporter", "runtimes", "calibration", "tests", "bench", "lock"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_python_m_exporter_is_the_same_cli():
    proc = subprocess.run([sys.executable, "-m", "exporter", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and "enginekit" in proc.stdout
