"""The runtime installs alone: the README's runtime-only command, in a bare venv, gets numpy,
onnxruntime and the service but no torch, transformers, onnx, onnxscript or polygraphy; a bundle that
the full venv built loads, infers (equal to the full venv's outputs) and serves from there; and a
build-time command in it says which extra to install instead of failing on an import."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import runtimes
from runtimes.samples import generate_feeds
from tests.conftest import ROOT

httpx = pytest.importorskip("httpx")
# A venv and an install from the package registry: ~1 min, so out of the fast loop (`make test-fast`).
pytestmark = pytest.mark.slow

# What a runtime-only install must not contain (distribution names as pip sees them).
BUILD_ONLY = ("torch", "transformers", "onnx", "onnxscript", "onnx-ir", "polygraphy", "nvidia-modelopt")


def _env() -> dict[str, str]:
    """This environment without the checkout on PYTHONPATH and without this venv."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def _run(cmd: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout, env=_env())


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bare venv with `pip install -c lock/requirements.txt '<checkout>[cpu,serve,genai]'` (the README's
    command), from a copy of the sources (so the build writes nothing into the checkout)."""
    base = tmp_path_factory.mktemp("runtime-only")
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for pkg in ("exporter", "runtimes", "calibration"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    venv = base / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)], base)
    assert made.returncode == 0, made.stderr
    pip = _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "-c", str(ROOT / "lock" / "requirements.txt"),
                f"{src}[cpu,serve,genai]"], base)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    return venv


def test_runtime_only_install_has_no_build_toolchain(runtime_venv):
    listed = _run([str(runtime_venv / "bin" / "python"), "-m", "pip", "list", "--format=json"], runtime_venv)
    names = {re.sub(r"[-_.]+", "-", p["name"]).lower(): p["version"] for p in json.loads(listed.stdout)}
    assert {"enginekit", "numpy", "onnxruntime", "starlette", "uvicorn", "tokenizers", "onnxruntime-genai",
            "jinja2"} <= set(names)
    assert not [n for n in BUILD_ONLY if n in names], sorted(names)
    locked = (ROOT / "lock" / "requirements.txt").read_text()
    assert f"onnxruntime=={names['onnxruntime']}" in locked and f"numpy=={names['numpy']}" in locked


def test_runtime_only_install_loads_infers_and_serves(runtime_venv, bert_bundle, tmp_path):
    py = str(runtime_venv / "bin" / "python")
    with runtimes.load(bert_bundle) as r:
        feeds = generate_feeds(r.manifest.io, {"batch": 2, "sequence": 9}, seed=5)
        want = r.infer(feeds)
    np.savez(tmp_path / "feeds.npz", **feeds)
    code = (
        "import sys, numpy as np, runtimes\n"
        f"feeds = dict(np.load({str(tmp_path / 'feeds.npz')!r}))\n"
        f"with runtimes.load({str(bert_bundle)!r}) as r:\n"
        f"    np.savez({str(tmp_path / 'out.npz')!r}, **r.infer(feeds))\n"
        "print('FILE', runtimes.__file__)\n"
    )
    proc = _run([py, "-c", code], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert str(runtime_venv) in proc.stdout  # the installed package, not the checkout
    got = dict(np.load(tmp_path / "out.npz"))
    assert set(got) == set(want)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-6)

    from bench.loadtest import decode_response, make_request, serve_process

    # The installed console script, outside the checkout and without it on PYTHONPATH.
    with serve_process([str(runtime_venv / "bin" / "enginekit"), "serve", str(bert_bundle), "--port", "0"],
                       env=_env(), cwd=tmp_path) as server:
        assert httpx.get(f"{server.url}/v2/health/ready", timeout=10).json()["ready"] is True
        req = make_request("bert", feeds, fmt="npz")
        resp = httpx.post(server.url + req.path, content=req.body, headers={"content-type": req.content_type}, timeout=30)
        assert resp.status_code == 200, resp.text[:300]
        served = decode_response(resp.content, resp.headers["content-type"])
        for name, value in want.items():
            np.testing.assert_allclose(served[name], value, rtol=1e-5, atol=1e-5)


def test_runtime_only_install_generates_and_serves_an_llm(runtime_venv, genai_bundle, tmp_path):
    """An ONNX Runtime GenAI bundle in the torch-free venv: the same greedy tokens as in the checkout, and the
    OpenAI API of `enginekit serve` answers with them."""
    from runtimes.generate import SamplingOptions, load_generator

    with load_generator(genai_bundle) as g:
        want = g.generate_ids([[5, 6, 7, 8]], SamplingOptions(max_new_tokens=8, stop_token_ids=[]))[0].tokens
        text = g.tokenizer.decode(g.generate("The capital", SamplingOptions(max_new_tokens=8)).tokens)
    code = ("import sys, runtimes.generate as G\n"
            f"with G.load_generator({str(genai_bundle)!r}) as g:\n"
            "    print(g.generate_ids([[5, 6, 7, 8]], G.SamplingOptions(max_new_tokens=8, stop_token_ids=[]))[0].tokens)\n"
            "    assert 'torch' not in sys.modules\n")
    proc = _run([str(runtime_venv / "bin" / "python"), "-c", code], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(want)
    from bench.loadtest import serve_process

    with serve_process([str(runtime_venv / "bin" / "enginekit"), "serve", str(genai_bundle), "--port", "0"],
                       env=_env(), cwd=tmp_path, ready_timeout=120) as server:
        resp = httpx.post(f"{server.url}/v1/completions", json={"model": genai_bundle.name, "prompt": "The capital",
                                                               "max_tokens": 8, "temperature": 0}, timeout=60)
        assert resp.status_code == 200, resp.text[:300]
        assert resp.json()["choices"][0]["text"] == text


def test_build_commands_name_the_build_extra(runtime_venv, tiny_bert_dir, tmp_path):
    exe = str(runtime_venv / "bin" / "enginekit")
    for args in (["build", f"hf:{tiny_bert_dir}", "-o", str(tmp_path / "b")], ["export", f"hf:{tiny_bert_dir}", "-o",
                 str(tmp_path / "m.onnx")], ["bench", str(tmp_path)]):
        proc = _run([exe, *args], tmp_path)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        text = " ".join(proc.stderr.split())
        assert "runtime-only install" in text and "'enginekit[build,cpu]'" in text, text
        assert "Traceback" not in proc.stderr and "torch" in text
    assert not (tmp_path / "b").exists() and not (tmp_path / "m.onnx").exists()
