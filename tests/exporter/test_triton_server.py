"""`enginekit triton --backend python` against a real tritonserver (PyPI's nvidia-pytriton, CPU).

The model repository is served, inferred over HTTP and gRPC by tritonclient in the Triton venv, and the
outputs must equal runtimes' bit for bit; two concurrent requests of different batch sizes go through
Triton's dynamic batcher (model.py stacks and splits them). A repository whose bundle copy was altered
must never become ready, with enginekit's sha256 paragraph in the server log.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import runtimes
from exporter.triton import TritonOptions, export_triton, parse_config
from runtimes.samples import generate_feeds

# In `make test` (CI) with everything else; out of the fast inner loop (a venv install and two real tritonservers: ~40 s).
pytestmark = pytest.mark.slow

CLIENT = r'''
import json
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

http_url, grpc_url, folder = sys.argv[1:4]
feeds = dict(np.load(f"{folder}/feeds.npz"))
pair = [dict(np.load(f"{folder}/pair{k}.npz")) for k in (0, 1)]
outputs = ["last_hidden_state", "pooler_output"]


def infer(module, client, feed):
    inputs = []
    for name, array in feed.items():
        tensor = module.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = client.infer("bert", inputs, outputs=[module.InferRequestedOutput(n) for n in outputs])
    return {n: result.as_numpy(n) for n in outputs}


http = httpclient.InferenceServerClient(http_url, concurrency=2)
np.savez(f"{folder}/http.npz", **infer(httpclient, http, feeds))
np.savez(f"{folder}/grpc.npz", **infer(grpcclient, grpcclient.InferenceServerClient(grpc_url), feeds))
clients = [httpclient.InferenceServerClient(http_url) for _ in pair]
with ThreadPoolExecutor(2) as pool:  # two requests at once: the dynamic batcher hands both to one execute()
    results = list(pool.map(lambda k: infer(httpclient, clients[k], pair[k]), range(2)))
for k, result in enumerate(results):
    np.savez(f"{folder}/pair{k}-out.npz", **result)
too_long = {name: np.ones((1, 100), np.int64) for name in feeds}  # sequence 100: the engine was built for <= 64
try:
    infer(httpclient, http, too_long)
    refused = {"status": None, "message": ""}
except Exception as exc:  # tritonclient's InferenceServerException
    refused = {"status": str(exc.status()), "message": exc.message()}
with open(f"{folder}/refused.json", "w") as f:
    json.dump(refused, f)
stats = http.get_inference_statistics("bert")["model_stats"][0]["batch_stats"]
with open(f"{folder}/stats.json", "w") as f:
    json.dump({int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats}, f)
'''


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _start(env: dict, repo: Path, log: Path) -> tuple[subprocess.Popen, list[int]]:
    ports = _free_ports(3)
    cmd = [str(env["tritonserver"]), "--model-repository", str(repo), "--backend-directory", str(env["backends"]),
           "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=""))
    return proc, ports


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(proc: subprocess.Popen, port: int, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while _status(f"http://127.0.0.1:{port}/v2/health/ready") != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-4000:]
            raise AssertionError(f"tritonserver not ready (exit {proc.poll()}); log tail:\n{tail}")
        time.sleep(0.3)


def _feeds_at(io: runtimes.IOSpec, batch: int, seed: int) -> dict[str, np.ndarray]:
    sizes = {name: dim.opt for name, dim in io.dims.items()}
    return generate_feeds(io, {**sizes, io.inputs[0].shape[0]: batch}, seed=seed)


def test_real_tritonserver_serves_the_bundle_bit_for_bit(bert_bundle, triton_env, tmp_path):
    repo = tmp_path / "repo"
    result = export_triton(bert_bundle, repo, TritonOptions(backend="python", python_env=triton_env["venv"],
                                                            max_delay_ms=200))
    cfg = parse_config((repo / "bert" / "config.pbtxt").read_text())
    assert cfg is None or (cfg.backend == "python" and cfg.parameters["EXECUTION_ENV_PATH"].string_value
                           == str(Path(triton_env["venv"]).resolve()))
    assert "1/model.py" in result["files"] and "1/bundle/manifest.json" in result["files"]
    with runtimes.load(bert_bundle) as runner:
        io = runner.manifest.io
        feeds = generate_feeds(io, "opt", seed=3)
        pair = [_feeds_at(io, 2, seed=4), _feeds_at(io, 3, seed=5)]
        expected = runner.infer(feeds)
        stacked = runner.infer({name: np.concatenate([f[name] for f in pair]) for name in feeds})
        expected_pair = [{name: a[:2] for name, a in stacked.items()}, {name: a[2:] for name, a in stacked.items()}]
        alone = [runner.infer(f) for f in pair]
    np.savez(tmp_path / "feeds.npz", **feeds)
    for k, feed in enumerate(pair):
        np.savez(tmp_path / f"pair{k}.npz", **feed)
    client = tmp_path / "client.py"
    client.write_text(CLIENT)

    log = tmp_path / "server.log"
    proc, ports = _start(triton_env, repo, log)
    try:
        _wait_ready(proc, ports[0], log)
        run = subprocess.run([str(triton_env["python"]), str(client), f"127.0.0.1:{ports[0]}",
                              f"127.0.0.1:{ports[1]}", str(tmp_path)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr[-4000:] + "\nserver log:\n" + log.read_text(errors="replace")[-3000:]
    finally:
        _stop(proc)
    refused = json.loads((tmp_path / "refused.json").read_text())  # enginekit's paragraph, as a client error
    assert refused["status"] == "400" and "Inputs do not fit engine 'bert'" in refused["message"], refused
    for protocol in ("http", "grpc"):
        got = np.load(tmp_path / f"{protocol}.npz")
        assert sorted(got.files) == sorted(expected)
        for name, array in expected.items():
            assert np.array_equal(got[name], array), (protocol, name)
    # The batch of 2 and the batch of 3 reached one execute() (one run of batch 5, after two of batch 4):
    # each answer is its rows of that stacked run, and matches running it alone up to GEMM blocking.
    assert json.loads((tmp_path / "stats.json").read_text()).get("5") == 1, (tmp_path / "stats.json").read_text()
    for k, want in enumerate(expected_pair):
        got = np.load(tmp_path / f"pair{k}-out.npz")
        for name, array in want.items():
            assert np.array_equal(got[name], array), (k, name)
            assert np.allclose(got[name], alone[k][name], rtol=1e-5, atol=1e-6), (k, name)


def test_altered_bundle_copy_never_becomes_ready(bert_bundle, triton_env, tmp_path):
    repo = tmp_path / "tampered"
    export_triton(bert_bundle, repo, TritonOptions(backend="python", python_env=triton_env["venv"]))
    engine = repo / "bert" / "1" / "bundle" / "model.onnx"
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 0x01
    engine.write_bytes(bytes(data))
    log = tmp_path / "server.log"
    proc, ports = _start(triton_env, repo, log)
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and "modified after the build" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-4000:]
            time.sleep(0.3)
        assert _status(f"http://127.0.0.1:{ports[0]}/v2/models/bert/ready") != 200
        time.sleep(0.5)  # let the paragraph's line be flushed in full
        text = log.read_text(errors="replace")
        assert "model.onnx was modified after the build (sha256 differs)" in text, text[-4000:]
    finally:
        _stop(proc)
