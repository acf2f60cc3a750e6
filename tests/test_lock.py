"""The lock is the environment: pyproject's ranges admit every locked version (so `make lock` and a
hand edit of pyproject.toml cannot drift apart unseen), and lock/check.py flags an installed package
that the lock does not pin or pins otherwise."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from types import ModuleType

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

tomllib = pytest.importorskip("tomllib")
LOCK = ROOT / "lock" / "requirements.txt"


def _check_module() -> ModuleType:
    """lock/check.py (a script, not a package module), imported from its file."""
    spec = importlib.util.spec_from_file_location("enginekit_lock_check", ROOT / "lock" / "check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pins() -> dict[str, str]:
    return dict(_check_module().read_pins(LOCK.read_text().splitlines()))


def _make_extras() -> list[str]:
    m = re.search(r"^EXTRAS := (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert m, "the Makefile names the extras it installs in EXTRAS"
    return m.group(1).strip().split(",")


def test_every_requirement_that_make_installs_is_locked_within_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins()
    reqs = list(project["dependencies"])
    for extra in _make_extras():
        reqs += project["optional-dependencies"][extra]
    problems = []
    for text in reqs:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is None:
            problems.append(f"{req.name}: not in the lock (run make lock)")
        elif not req.specifier.contains(pinned, prereleases=True):
            problems.append(f"{req}: the lock has {pinned} (run make lock, or fix the range)")
    assert not problems, problems


def test_the_lock_pins_torch_without_a_local_build_label():
    pins = _pins()
    assert re.fullmatch(r"\d+\.\d+\.\d+", pins["torch"]), pins["torch"]


def test_check_flags_drift_and_passes_the_lock_itself(tmp_path):
    mismatches = _check_module().mismatches
    pins = {"numpy": "2.4.6", "torch": "2.13.0"}
    assert mismatches(pins, {"numpy": "2.4.6", "torch": "2.13.0+cpu", "pip": "23.2.1"}) == []
    assert mismatches(pins, {"numpy": "2.5.0"}) == ["numpy==2.5.0 is installed, the lock says 2.4.6"]
    assert mismatches(pins, {"left-pad": "1.0"}) == ["left-pad==1.0 is installed but not in the lock"]
    # and the real script, on a lock that this environment does not match, exits 1 with the fix
    bad = tmp_path / "lock.txt"
    bad.write_text("numpy==0.0.1\n")
    proc = subprocess.run([sys.executable, str(ROOT / "lock" / "check.py"), str(bad)], capture_output=True, text=True)
    assert proc.returncode == 1 and "numpy==" in proc.stderr and "make lock" in proc.stderr
