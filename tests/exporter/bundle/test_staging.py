"""Staging folders and publishing (exporter/bundle/staging.py): what a killed build leaves behind is
removed by the next build into the same folder, and --force swaps bundles without a gap."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.bundle import staging as st
from exporter.bundle.staging import OWNER_FILE, keep_rejected, new_staging, publish, remove_staging
from tests.conftest import ROOT


def _dead_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def _folder(path: Path, files: int = 1) -> Path:
    path.mkdir()
    for i in range(files):
        (path / f"part{i}.bin").write_bytes(b"x" * 1024)
    return path


def test_new_staging_removes_siblings_of_dead_builds_and_keeps_live_ones(tmp_path):
    dead = _dead_pid()
    stale = _folder(tmp_path / f".bundle.partial-{dead}-deadbeef", files=3)
    stale_old = _folder(tmp_path / f".bundle.old-{dead}-0badf00d")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        live = _folder(tmp_path / f".bundle.partial-{sleeper.pid}-cafebabe")  # no owner file: judged by its PID
        init = _folder(tmp_path / ".bundle.partial-1-12345678")  # PID 1 is alive (or not ours to signal)
        other = _folder(tmp_path / f".other.partial-{dead}-12345678")  # another output's staging
        lookalike = _folder(tmp_path / f".bundle.partial-{dead}-notahexname")
        staging = new_staging(tmp_path / "bundle")
        try:
            assert not stale.exists() and not stale_old.exists()
            assert live.exists() and init.exists() and other.exists() and lookalike.exists()
            assert staging.is_dir() and (staging / OWNER_FILE).is_file()
        finally:
            remove_staging(staging)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not staging.exists()


def test_a_lock_nobody_holds_marks_a_folder_stale_even_when_its_pid_is_alive(tmp_path):
    """PID reuse: the folder's PID now belongs to a live process (this one), but the build that made
    it is gone, so nobody holds its owner lock."""
    reused = _folder(tmp_path / f".bundle.partial-{os.getpid()}-a1b2c3d4")
    (reused / OWNER_FILE).write_text(f"{os.getpid()}\n")
    staging = new_staging(tmp_path / "bundle")
    remove_staging(staging)
    assert not reused.exists()


_HOLDER = """
import sys, time
from pathlib import Path
from exporter.bundle.staging import new_staging
print(new_staging(Path(sys.argv[1])), flush=True)
time.sleep(120)
"""


def test_a_killed_build_leaves_a_folder_that_the_next_build_removes(tmp_path):
    dest = tmp_path / "out" / "bundle"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(dest)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        theirs = Path(holder.stdout.readline().strip())
        assert theirs.is_dir() and theirs.name.startswith(f".bundle.partial-{holder.pid}-")
        ours = new_staging(dest)  # their build is alive: its folder stays
        remove_staging(ours)
        assert theirs.is_dir()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    ours = new_staging(dest)
    remove_staging(ours)
    assert not theirs.exists() and list(dest.parent.iterdir()) == []


def _bundle(path: Path, text: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(text)
    return path


def test_publish_over_an_existing_bundle_leaves_only_the_new_one(tmp_path):
    out = _bundle(tmp_path / "b", "old")
    (out / "old-only.txt").write_text("x")
    staging = new_staging(out)
    _bundle(staging, "new")
    publish(staging, out)
    remove_staging(staging)
    assert (out / "manifest.json").read_text() == "new" and sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no .b.old-*, no .b.partial-*, no owner file


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_publish_over_an_existing_bundle_is_one_exchange_not_two_renames(tmp_path, monkeypatch):
    """With RENAME_EXCHANGE the old bundle never leaves the output path: no os.replace is needed."""
    out = _bundle(tmp_path / "b", "old")
    bundle = _bundle(tmp_path / "staged", "new")

    def no_rename(*_args):
        raise AssertionError("os.replace: the output path would be empty between two renames")

    monkeypatch.setattr(st.os, "replace", no_rename)
    publish(bundle, out)
    assert (out / "manifest.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_publish_falls_back_to_two_renames_without_renameat2(tmp_path, monkeypatch):
    monkeypatch.setattr(st, "_exchange", lambda a, b: False)
    out = _bundle(tmp_path / "b", "old")
    publish(_bundle(tmp_path / "staged", "new"), out)
    assert (out / "manifest.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_keep_rejected_replaces_an_older_rejected_bundle(tmp_path):
    _bundle(tmp_path / "b.rejected", "older")
    rejected = keep_rejected(_bundle(tmp_path / "staged", "failed"), tmp_path / "b")
    assert rejected == tmp_path / "b.rejected" and (rejected / "manifest.json").read_text() == "failed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.rejected"]
