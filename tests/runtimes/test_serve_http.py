"""The real service on 127.0.0.1, driven by a real HTTP client (httpx): answers equal direct runtime
calls, concurrent load batches without failures, malformed requests get 4xx and leave it healthy,
SIGTERM lets requests in flight finish, and the server process never imports torch."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import runtimes
from bench.loadtest import (
    Request,
    batch_stats,
    decode_response,
    make_request,
    run_load,
    scrape,
    serve_process,
)
from runtimes.samples import generate_feeds
from tests.conftest import ROOT
from tests.runtimes.test_thin import HEAVY

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
ENGINEKIT = str(Path(sys.executable).with_name("enginekit"))
MAX_BODY = 1 << 20  # the module's server takes bodies up to 1 MiB, so 413 is cheap to provoke


@pytest.fixture(scope="module")
def runner(bert_bundle):
    with runtimes.load(bert_bundle) as r:
        yield r


def renamed_copy(bundle: Path, dst: Path, name: str) -> Path:
    shutil.copytree(bundle, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    (dst / "manifest.json").write_text(json.dumps({**manifest, "name": name}))
    return dst


@pytest.fixture(scope="module")
def server(bert_bundle, tmp_path_factory):
    """The CLI's server on two bundles: the tiny BERT, and a copy of it named 'bert-copy'."""
    copy = renamed_copy(bert_bundle, tmp_path_factory.mktemp("serve") / "copy", "bert-copy")
    with serve_process([ENGINEKIT, "serve", str(bert_bundle), str(copy), "--port", "0", "--max-delay-ms", "5",
                        "--max-body-mb", "1"]) as s:
        yield s


def feeds(runner, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    return generate_feeds(runner.manifest.io, {"batch": batch, "sequence": seq}, seed=seed)


def expect_outputs(want: dict[str, np.ndarray], response) -> str | None:
    if response.status_code != 200:
        return response.text[:300]
    got = decode_response(response.content, response.headers["content-type"])
    for name, value in got.items():
        if not np.array_equal(value, want[name]):
            return f"'{name}' differs from the direct runtime call by {np.abs(value - want[name]).max()}"
    return None


def test_health_metadata_and_errors_for_routes(server):
    assert httpx.get(f"{server.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": True, "models": ["bert", "bert-copy"]}
    meta = httpx.get(f"{server.url}/v2/models/bert").json()
    assert [i["name"] for i in meta["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert meta["outputs"][0] == {"name": "last_hidden_state", "datatype": "FP32", "shape": [-1, -1, 32],
                                  "named_shape": ["batch", "sequence", 32]}
    assert meta["versions"] == ["1"] and meta["inputs"][0]["datatype"] == "INT64"
    assert meta["dims"]["batch"] == {"min": 1, "opt": 4, "max": 16}
    assert meta["batching"]["dim"] == "batch" and meta["batching"]["max_batch"] == 16
    assert [m["name"] for m in httpx.get(f"{server.url}/v2/models").json()["models"]] == ["bert", "bert-copy"]
    missing = httpx.get(f"{server.url}/v2/models/nope")
    assert missing.status_code == 404 and "served models ['bert', 'bert-copy']" in missing.json()["error"]
    assert httpx.get(f"{server.url}/v2/models/bert/infer").status_code == 405
    assert httpx.get(f"{server.url}/nowhere").status_code == 404


def test_the_server_process_has_no_torch_loaded(server):
    maps = Path(f"/proc/{server.proc.pid}/maps")
    if not maps.exists():
        pytest.skip("needs /proc")
    libs = maps.read_text()
    assert "onnxruntime" in libs and "libtorch" not in libs


def test_json_and_npz_answers_equal_direct_runtime_calls(server, runner):
    for i, (batch, seq) in enumerate([(1, 5), (3, 64), (16, 1)]):
        f = feeds(runner, batch, seq, seed=i)
        want = runner.infer(f)
        for fmt, model in (("json", "bert"), ("npz", "bert"), ("json", "bert-copy")):
            req = make_request(model, f, fmt)
            r = httpx.post(server.url + req.path, content=req.body, headers={"content-type": req.content_type})
            assert expect_outputs(want, r) is None, (fmt, batch, seq, r.text[:300])
            assert r.headers["content-type"].startswith(req.content_type)
    req = make_request("bert", feeds(runner, 2, 7, seed=9), "json", ["pooler_output"])
    r = httpx.post(server.url + req.path, content=req.body,
                   headers={"content-type": req.content_type, "accept": "application/x-npz"})
    assert r.headers["content-type"] == "application/x-npz"
    assert list(decode_response(r.content, r.headers["content-type"])) == ["pooler_output"]


def test_concurrent_load_batches_without_a_single_failure(server, runner):
    """2,000 requests from 32 clients at once, mixed lengths, rows and formats; every answer checked."""
    payloads = [feeds(runner, 1 + i % 2, (8, 16, 24, 32)[i % 4], seed=100 + i) for i in range(48)]
    wanted = [runner.infer(f) for f in payloads]
    requests = [make_request("bert", f, "npz" if i % 2 else "json", [] if i % 2 else ["pooler_output"])
                for i, f in enumerate(payloads)]
    before = scrape(server.url)
    result = run_load(server.url, requests, total=2000, concurrency=32,
                      check=lambda i, r: expect_outputs(wanted[i % len(wanted)], r))
    after = scrape(server.url)
    assert result.failures == [] and result.statuses.count(200) == 2000
    stats = batch_stats(before, after, "bert")
    rows = sum(len(payloads[i % len(payloads)]["input_ids"]) for i in range(2000))
    assert after['enginekit_batch_size_sum{model="bert"}'] - before['enginekit_batch_size_sum{model="bert"}'] == rows
    assert stats["engine_runs"] < 2000 and stats["mean_batch_rows"] > 1.5, stats  # batching is visible
    done = 'enginekit_requests_total{code="200",model="bert"}'
    assert after[done] - before.get(done, 0) == 2000


def bad_requests(runner) -> list[tuple[Request, int]]:
    """One of each kind of malformed request, with the status it must get."""
    ok = feeds(runner, 2, 8, seed=1)
    path = "/v2/models/bert/infer"
    as_json = lambda inputs: json.dumps({"inputs": inputs}).encode()
    lists = {k: v.tolist() for k, v in ok.items()}

    def npz_bytes(**arrays: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w") as zf:
        head = io.BytesIO()
        np.lib.format.write_array_header_1_0(head, {"descr": "<i8", "fortran_order": False, "shape": (10**11, 8)})
        zf.writestr("input_ids.npy", head.getvalue() + b"\0" * 64)
    out_of_vocab = {**ok, "input_ids": ok["input_ids"] + 10_000}
    J, N = "application/json", "application/x-npz"
    cases = [
        (b"{bad json", J, 400), (b"[1, 2, 3]", J, 400), (b'{"input_ids": [[1]]}', J, 400), (b"", J, 400),
        (b"[" * 50_000, J, 400), (b"\xff\xfe\x00", J, 400),
        (as_json({("input_idz" if k == "input_ids" else k): v for k, v in lists.items()}), J, 422),
        (as_json({"input_ids": [[1, 2]], "attention_mask": [[1, 1]]}), J, 422),
        (as_json({**lists, "input_ids": [[0.5] * 8] * 2}), J, 422),
        (as_json({**lists, "input_ids": [["a"] * 8] * 2}), J, 422),
        (as_json({**lists, "input_ids": [[1, 2], [3]]}), J, 422),
        (as_json({**lists, "input_ids": [[2**70] * 8] * 2}), J, 422),
        (as_json({k: [v] for k, v in lists.items()}), J, 422),
        (as_json({k: [[1] * 65] for k in lists}), J, 422),
        (as_json({k: [[1] * 4] * 17 for k in lists}), J, 422),
        (as_json({**lists, "attention_mask": [[1] * 9] * 2}), J, 422),
        (npz_bytes(**out_of_vocab), N, 422),
        (npz_bytes(**{**ok, "input_ids": ok["input_ids"].astype(np.int32)}), N, 422),
        (npz_bytes(**{**ok, "input_ids": np.array([{"x": 1}], dtype=object)}), N, 400),
        (b"PK\x03\x04garbage", N, 400), (b"\x93NUMPY not a zip", N, 400), (bomb.getvalue(), N, 400),
        (b"x" * (MAX_BODY + 1), J, 413), (b"input_ids=1", "text/plain", 415),
    ]
    out = [(Request(path, body, ctype), status) for body, ctype, status in cases]
    out.append((Request("/v2/models/nope/infer", as_json(lists), J), 404))
    out.append((Request(path + "?outputs=nope", as_json(lists), J), 422))
    return out


def test_a_thousand_malformed_requests_get_4xx_and_leave_the_server_healthy(server, runner):
    bad = bad_requests(runner)
    valid = [feeds(runner, 1, (8, 12)[i % 2], seed=200 + i) for i in range(8)]
    wanted = [runner.infer(f) for f in valid]
    # 1,000 malformed requests interleaved with 200 valid ones (some share batches with refused inputs)
    plan = [("bad", i % len(bad)) for i in range(1000)] + [("ok", i % len(valid)) for i in range(200)]
    np.random.default_rng(0).shuffle(plan)
    requests = [bad[j][0] if kind == "bad" else make_request("bert", valid[j], "npz") for kind, j in plan]

    def check(i: int, r) -> str | None:
        kind, j = plan[i]
        if kind == "ok":
            return expect_outputs(wanted[j], r)
        want = bad[j][1]
        if r.status_code != want or "error" not in r.json():
            return f"case {j}: expected {want}, got {r.status_code}: {r.text[:200]}"
        return None

    before = scrape(server.url)
    result = run_load(server.url, requests, total=len(requests), concurrency=16, check=check)
    after = scrape(server.url)
    assert result.failures == [], result.failures[:5]
    errors = sum(v for k, v in after.items() if k.startswith("enginekit_errors_total")) - \
        sum(v for k, v in before.items() if k.startswith("enginekit_errors_total"))
    assert errors == 1000
    assert server.proc.poll() is None
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    last = make_request("bert", valid[0], "json")
    r = httpx.post(server.url + last.path, content=last.body, headers={"content-type": last.content_type})
    assert expect_outputs(wanted[0], r) is None


def test_sigterm_lets_requests_in_flight_finish_and_the_service_imports_no_torch(bert_bundle, runner):
    """12 requests of distinct lengths wait up to 1 s for batch-mates when SIGTERM arrives: all must answer."""
    # run_server returns after the drain (runtimes/serve/server.py: no re-raised SIGTERM), so the
    # harness can then report what the process imported.
    code = textwrap.dedent(f"""
        import sys
        from runtimes.serve import ServeConfig, run_server
        run_server([{str(bert_bundle)!r}], port=0, config=ServeConfig(max_delay_ms=1000), log_level="warning")
        print("HEAVY:", [m for m in {HEAVY!r} if m in sys.modules], flush=True)
    """)
    payloads = [feeds(runner, 1, 4 + i, seed=300 + i) for i in range(12)]
    wanted = [runner.infer(f) for f in payloads]
    requests = [make_request("bert", f, "json") for f in payloads]
    with serve_process([sys.executable, "-c", code]) as s:
        results = []
        load = threading.Thread(target=lambda: results.append(run_load(
            s.url, requests, total=12, concurrency=12, check=lambda i, r: expect_outputs(wanted[i], r))))
        load.start()
        gauge = 'enginekit_inflight_requests{model="bert"}'
        deadline = time.monotonic() + 20
        while scrape(s.url).get(gauge, 0) < 12 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert scrape(s.url)[gauge] == 12
        t0 = time.monotonic()
        rc = s.stop(timeout=30)
        load.join(30)
        assert rc == 0 and time.monotonic() - t0 < 15
        assert results and results[0].failures == [] and results[0].statuses == [200] * 12
        time.sleep(0.2)  # let the output pump read the last line
        out = "".join(s.lines)
    assert re.search(r"HEAVY: \[\]", out), out[-2000:]


def test_cli_refuses_what_it_cannot_serve(bert_bundle, tmp_path):
    from tests.conftest import run_cli

    proc = run_cli("serve", str(tmp_path / "missing"), "--port", "0", timeout=120)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("serve", str(bert_bundle), "--port", "0", "--max-batch", "64", timeout=120)
    assert proc.returncode == 2 and "--max-batch between 1 and 16" in proc.stderr
    proc = run_cli("serve", str(bert_bundle), str(renamed_copy(bert_bundle, tmp_path / "same", "bert")), timeout=120)
    assert proc.returncode == 2 and "two bundles are named 'bert'" in proc.stderr


def test_importing_the_service_needs_none_of_its_server_packages():
    """`import runtimes.serve` (e.g. for the batcher alone) loads no HTTP stack; create_app/run_server do."""
    code = ("import sys, runtimes.serve; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('starlette', 'uvicorn', 'prometheus_client', 'onnxruntime', 'torch')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_not_ready_until_warm_up_is_done(bert_bundle):
    """In-process (Starlette's TestClient runs the lifespan): /ready and /infer answer 503 while warming up."""
    from starlette.testclient import TestClient

    from runtimes.serve import Metrics, ServeConfig, create_app, load_models

    config, metrics = ServeConfig(), Metrics()
    [model] = load_models([bert_bundle], config, metrics)
    release = threading.Event()
    model.warm_up = lambda: release.wait(20)  # type: ignore[method-assign]
    req = make_request("bert", generate_feeds(model.runner.manifest.io, "min"), "json")
    with TestClient(create_app([model], metrics, config)) as client:
        assert client.get("/v2/health/live").status_code == 200
        not_ready = client.get("/v2/health/ready")
        assert not_ready.status_code == 503 and not_ready.json()["reason"] == "warming up"
        early = client.post(req.path, content=req.body, headers={"content-type": req.content_type})
        assert early.status_code == 503 and "warming up" in early.json()["error"]
        release.set()
        deadline = time.monotonic() + 20
        while client.get("/v2/health/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.post(req.path, content=req.body, headers={"content-type": req.content_type}).status_code == 200
