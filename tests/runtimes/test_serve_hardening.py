"""The service under hostile or unlucky clients, each against a real server process on 127.0.0.1:
large JSON bodies do not stall other routes, stalled uploads time out (408) and do not hold up a
shutdown (503), a flood of connections meets uvicorn's limit (503), disconnects are counted as 499
without a traceback, a taken port is one paragraph and exit 2, SIGTERM drains and exits 0, request
heads over 64 KiB are refused, and ?outputs=, Content-Type and /v2/models leak or guess nothing."""

from __future__ import annotations

import json
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import runtimes
from bench.loadtest import make_request, scrape, serve_process
from runtimes.samples import generate_feeds
from tests.conftest import run_cli

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
ENGINEKIT = str(Path(sys.executable).with_name("enginekit"))
BODY_TIMEOUT_S = 2.0
LIMIT = 16  # --limit-concurrency of the module's server
INFER = "/v2/models/bert/infer"


@pytest.fixture(scope="module")
def server(bert_bundle):
    with serve_process([ENGINEKIT, "serve", str(bert_bundle), "--port", "0", "--max-body-mb", "64",
                        "--body-timeout-s", str(BODY_TIMEOUT_S), "--limit-concurrency", str(LIMIT)]) as s:
        yield s


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def head(path: str, length: int | None, content_type: str | None = "application/json", extra: str = "") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: test"] + ([f"Content-Type: {content_type}"] if content_type else [])
    lines += ([f"Content-Length: {length}"] if length is not None else []) + ([extra] if extra else [])
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket, timeout: float) -> tuple[int | None, dict[str, str], bytes]:
    """(status, headers, body) of one response; status None if the connection closed without one."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        top, _, body = data.partition(b"\r\n\r\n")
        if not top.startswith(b"HTTP/1.1 "):
            return None, {}, b""
        lines = top.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    except (ConnectionResetError, BrokenPipeError):
        return None, {}, b""
    return int(lines[0].split()[1]), headers, body


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_health_answers_while_a_large_json_body_is_decoded(server):
    """48 MiB of JSON take ~1-3 s to decode; /v2/health/live must keep answering meanwhile, within 0.5 s or a
    quarter of the decode on a loaded machine (decoded on the event loop, every probe waited for the whole decode)."""
    rows = np.random.default_rng(0).integers(1000, 30000, (117_000, 64)).tolist()  # too many rows: a 422 at the end
    body = json.dumps({"inputs": {"input_ids": rows}}).encode()
    with socket.create_connection(address(server.url)) as sock, httpx.Client(base_url=server.url, timeout=30) as probe:
        sock.sendall(head(INFER, len(body)) + body)
        sent = time.monotonic()
        latencies = []
        while not select.select([sock], [], [], 0)[0] and time.monotonic() - sent < 60:
            t0 = time.monotonic()
            assert probe.get("/v2/health/live").status_code == 200
            latencies.append(time.monotonic() - t0)
            time.sleep(0.02)
        decoding = time.monotonic() - sent
        status, _, answer = read_response(sock, 30)
    assert status == 422 and "outside the built range" in json.loads(answer)["error"]
    assert decoding > 0.5 and len(latencies) >= 5, (decoding, latencies)  # the probes overlapped the decode
    # Decoded on the event loop, a probe waits for the whole decode (latency ~ decoding). The bound scales with the
    # decode so that a loaded CI machine (the other test worker's builds on the same 2 cores: a 7.35 s decode, a
    # 0.55 s probe in one fresh-clone run) does not fail a server that keeps answering.
    bound = max(0.5, 0.25 * decoding)
    assert max(latencies) < bound, f"a probe took {max(latencies):.2f} s while the body decoded ({decoding:.2f} s)"


def test_a_stalled_body_gets_408_in_json_and_the_connection_is_closed(server):
    with socket.create_connection(address(server.url)) as sock:
        t0 = time.monotonic()
        sock.sendall(head(INFER, 1000) + b'{"inputs":')  # 10 of the 1,000 bytes it declares
        status, headers, body = read_response(sock, BODY_TIMEOUT_S + 10)
        waited = time.monotonic() - t0
        assert status == 408 and headers.get("connection") == "close", (status, headers, body)
        error = json.loads(body)["error"]
        assert "1000 bytes declared" in error and "--body-timeout-s" in error and "10 bytes arrived" in error
        assert BODY_TIMEOUT_S - 0.2 < waited < BODY_TIMEOUT_S + 5
        assert closed_by_peer(sock, 5)
    assert httpx.get(f"{server.url}/v2/health/live").status_code == 200


def test_a_flood_of_connections_gets_503_from_uvicorn_not_unbounded_tasks(server):
    idle = [socket.create_connection(address(server.url)) for _ in range(LIMIT)]
    try:
        time.sleep(0.2)  # let the server accept them all
        flooded = httpx.get(f"{server.url}/v2/health/live", timeout=10)
        assert flooded.status_code == 503
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 10
    while httpx.get(f"{server.url}/v2/health/live").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(f"{server.url}/v2/health/live").status_code == 200


def test_a_client_that_disconnects_mid_body_is_a_499_without_a_traceback(server):
    before = scrape(server.url)
    with socket.create_connection(address(server.url)) as sock:
        sock.sendall(head(INFER, 1000) + b'{"inputs":')
        time.sleep(0.3)  # the handler is waiting for the rest of the body
    key = 'enginekit_requests_total{code="499",model="bert"}'
    deadline = time.monotonic() + 10
    while scrape(server.url).get(key, 0) == before.get(key, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    after = scrape(server.url)
    assert after[key] - before.get(key, 0) == 1
    kind = 'enginekit_errors_total{kind="client_disconnect",model="bert"}'
    assert after[kind] - before.get(kind, 0) == 1
    failed = 'enginekit_requests_total{code="500",model="bert"}'
    assert after.get(failed, 0) == before.get(failed, 0)
    time.sleep(0.2)  # let the output pump read what the server logged
    log = "".join(server.lines)
    assert "Traceback" not in log and "inference on 'bert' failed" not in log, log[-2000:]


def test_request_heads_over_64_kib_are_refused_and_the_server_stays_up(server):
    """h11 refuses a head still incomplete after 64 KiB; one that arrives whole in a single socket read
    (<= 256 KiB) passes, so 1 MiB is the smallest size sure to be refused whatever the timing."""
    fits = httpx.get(f"{server.url}/v2/health/live", headers={"x-padding": "a" * 40_000})
    assert fits.status_code == 200  # above h11's own 16 KiB default, within the service's 64 KiB
    for size in (1 << 20, 8 << 20):  # one header of 8 MB was answered 200 with httptools
        with socket.create_connection(address(server.url)) as sock:
            request = f"GET /v2/health/live HTTP/1.1\r\nHost: t\r\nX-Big: {'a' * size}\r\n\r\n".encode()
            try:
                sock.sendall(request)
            except (ConnectionResetError, BrokenPipeError):
                pass  # refused before the whole head was sent
            status, _, _ = read_response(sock, 10)
        assert status is None or 400 <= status < 500, status
    assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
    assert server.proc.poll() is None


def test_an_empty_outputs_selection_is_422_naming_the_outputs(server, bert_bundle):
    with runtimes.load(bert_bundle) as r:
        req = make_request("bert", generate_feeds(r.manifest.io, "min"), "json")
    for query in ("?outputs=,,,", "?outputs=", "?outputs=%20,%20"):
        resp = httpx.post(server.url + INFER + query, content=req.body, headers={"content-type": req.content_type})
        assert resp.status_code == 422, (query, resp.text)
        assert "last_hidden_state, pooler_output" in resp.json()["error"]
    resp = httpx.post(server.url + INFER + "?outputs=pooler_output,pooler_output", content=req.body,
                      headers={"content-type": req.content_type})
    assert resp.status_code == 200 and list(resp.json()["outputs"]) == ["pooler_output"]


def test_a_post_without_content_type_is_415_naming_both_types(server, bert_bundle):
    with runtimes.load(bert_bundle) as r:
        body = make_request("bert", generate_feeds(r.manifest.io, "min"), "json").body  # valid JSON
    with socket.create_connection(address(server.url)) as sock:
        sock.sendall(head(INFER, len(body), content_type=None) + body)
        status, _, answer = read_response(sock, 10)
    error = json.loads(answer)["error"]
    assert status == 415 and "application/json" in error and "application/x-npz" in error
    assert "no Content-Type header" in error


def test_model_metadata_shows_no_filesystem_path(server, bert_bundle):
    spec = json.loads((bert_bundle / "manifest.json").read_text())["source"]["spec"]  # hf:/tmp/.../tiny-bert0
    location = spec.split(":", 1)[1]
    for path in ("/v2/models", "/v2/models/bert"):
        text = httpx.get(server.url + path).text
        assert location not in text and str(bert_bundle) not in text and "/tmp" not in text, text[:500]
    source = httpx.get(f"{server.url}/v2/models/bert").json()["source"]
    assert source == {"kind": "hf", "name": Path(location).name, "task": "feature-extraction"}


@pytest.mark.parametrize("spec, kind, name", [
    ("hf:/home/u/models/bert-base#fill-mask", "hf", "bert-base"), ("hf:sentence-transformers/all-MiniLM-L6-v2", "hf",
                                                                    "all-MiniLM-L6-v2"),
    ("py:/srv/app/models.py:make", "py", "models.py:make"), ("py:pkg.models:make", "py", "pkg.models:make"),
    ("onnx:../x/model.onnx", "onnx", "model.onnx"), ("onnx:C:\\models\\m.onnx", "onnx", "m.onnx"),
    ("timm:resnet18#pretrained", "timm", "resnet18"), ("hf:/home/u/models/x/", "hf", "x"), ("", None, None),
])
def test_public_source_keeps_the_kind_and_last_name_only(spec, kind, name):
    from runtimes.serve.app import public_source

    assert public_source({"spec": spec}) == {"kind": kind, "name": name, "task": None}


def test_request_errors_keep_their_status_across_the_worker_process():
    """Large JSON is decoded in a worker process (offload.py); its errors come back pickled and must keep
    their status (an exception's __dict__ travels with it; a guard, not a fix)."""
    import pickle

    from runtimes.serve.codec import RequestError

    back = pickle.loads(pickle.dumps(RequestError("too big", status=413)))
    assert type(back) is RequestError and back.status == 413 and str(back) == "too big"


def test_a_taken_port_is_one_paragraph_and_exit_2_within_seconds(bert_bundle):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        t0 = time.monotonic()
        try:
            proc = run_cli("serve", str(bert_bundle), "--port", str(port), timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"enginekit serve on a taken port {port} still ran after 20 s")
        assert proc.returncode == 2 and time.monotonic() - t0 < 20
        assert f"port {port} on 127.0.0.1" in proc.stderr and "in use" in proc.stderr and "--port" in proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout
    proc = run_cli("serve", str(bert_bundle), "--host", "203.0.113.7", "--port", "0", timeout=20)  # TEST-NET-3
    assert proc.returncode == 2 and "binding 203.0.113.7:0 failed" in proc.stderr and "Traceback" not in proc.stderr


def test_sigterm_drains_answers_unfinished_bodies_503_and_exits_0(bert_bundle):
    """A request in the batcher (waiting 1 s for batch-mates) finishes with 200; an upload still sending
    its body gets a JSON 503 at once instead of holding the exit for --graceful 30 s; the exit code is 0."""
    with runtimes.load(bert_bundle) as r:
        feeds = generate_feeds(r.manifest.io, {"batch": 1, "sequence": 8}, seed=1)
        want = r.infer(feeds)["pooler_output"]
    req = make_request("bert", feeds, "json", ["pooler_output"])
    with serve_process([ENGINEKIT, "serve", str(bert_bundle), "--port", "0", "--max-delay-ms", "1000"]) as s:
        answers = []
        client = threading.Thread(target=lambda: answers.append(httpx.post(
            s.url + req.path, content=req.body, headers={"content-type": req.content_type}, timeout=30)))
        stalled = socket.create_connection(address(s.url))
        stalled.sendall(head(INFER, 1000) + b'{"inputs":')
        client.start()
        gauge = 'enginekit_inflight_requests{model="bert"}'
        deadline = time.monotonic() + 20
        while scrape(s.url).get(gauge, 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        status, headers, body = read_response(stalled, 10)
        refused = time.monotonic() - t0
        stalled.close()
        rc = s.proc.wait(30)
        exited = time.monotonic() - t0
        client.join(30)
    assert status == 503 and headers.get("connection") == "close" and refused < 2, (status, headers, body, refused)
    assert "shutting down" in json.loads(body)["error"]
    assert answers and answers[0].status_code == 200, answers
    assert np.array_equal(np.asarray(answers[0].json()["outputs"]["pooler_output"], np.float32), want)
    assert rc == 0 and exited < 10, (rc, exited, "".join(s.lines)[-2000:])
