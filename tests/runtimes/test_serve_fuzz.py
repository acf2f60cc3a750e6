"""Seeded fuzzing of the real service on 127.0.0.1: 2,400 requests from a fixed seed, malformed but
for ~4% valid ones mixed in, sent over raw sockets so that broken HTTP can be sent too. Every answer
must be a 4xx (408 for a body that stalls), never a 5xx; the server must be alive and answering
correctly afterwards, with no traceback in its log and its memory bounded. `pytest -s` prints the
counts and the RSS figures."""

from __future__ import annotations

import asyncio
import collections
import io
import json
import random
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import runtimes
from bench.loadtest import decode_response, make_request, scrape, serve_process
from runtimes.samples import generate_feeds

# In `make test` (CI) with everything else; out of the fast inner loop (2,400 requests against a real server: ~25 s).
pytestmark = pytest.mark.slow

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
ENGINEKIT = str(Path(sys.executable).with_name("enginekit"))
SEED = 20261201
TOTAL = 2400
CONCURRENCY = 16
MAX_BODY = 4 << 20  # the server's --max-body-mb 4: room for JSON bodies large enough for the worker process
RSS_GROWTH_LIMIT_MIB = 200
INFER = "/v2/models/bert/infer"
J, N = "application/json", "application/x-npz"


@dataclass
class Case:
    kind: str
    request: bytes
    allowed: frozenset[int]
    silent_ok: bool = False  # the connection may close without an answer (refused head, client hung up)
    hang_up: bool = False  # the client closes right after sending (a truncated upload)


def http(path: str, body: bytes = b"", ctype: str | None = J, *, method: str = "POST", length: int | None = None,
         extra: tuple[str, ...] = ()) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: fuzz", "Connection: close", *extra]
    lines += [f"Content-Type: {ctype}"] if ctype is not None else []
    lines += [f"Content-Length: {len(body) if length is None else length}"] if method == "POST" else []
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def npy_member(shape: tuple[int, ...], descr: str = "<i8", data: bytes = b"\0" * 64) -> bytes:
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": descr, "fortran_order": False, "shape": shape})
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("input_ids.npy", head.getvalue() + data)
    return out.getvalue()


class Generator:
    """Malformed requests of every kind, from one seed; `valid` feeds are the base they are broken from."""

    def __init__(self, rng: random.Random, valid: list[dict[str, np.ndarray]]):
        self.rng, self.feeds = rng, valid

    def base(self) -> dict[str, np.ndarray]:
        return self.rng.choice(self.feeds)

    def lists(self) -> dict[str, list]:
        return {k: v.tolist() for k, v in self.base().items()}

    def body(self, inputs: object) -> bytes:
        return json.dumps({"inputs": inputs}).encode()

    def broken_json(self) -> Case:
        text = bytearray(self.body(self.lists()))
        r = self.rng
        while True:
            op = r.randrange(3)
            if op == 0:
                del text[r.randrange(len(text)):]
            elif op == 1:
                text.insert(r.randrange(len(text) + 1), r.choice(b'{}[]",:x\\\x00\xff'))
            else:
                del text[r.randrange(len(text))]
            try:
                json.loads(bytes(text))
            except ValueError:
                return Case("broken_json", http(INFER, bytes(text)), frozenset({400}))

    def wrong_types(self) -> Case:
        r, lists = self.rng, self.lists()
        name = r.choice(list(lists))
        value = r.choice([None, True, "ids", {"a": 1}, [None], [["a", 1]], [[1, [2]]], [[True] * 8], [[{}]], 3])
        body = r.choice([self.body({**lists, name: value}), self.body(value), json.dumps(value).encode(),
                         json.dumps({"input": lists}).encode()])
        return Case("wrong_types", http(INFER, body), frozenset({400, 422}))

    def huge_numbers(self) -> Case:
        lists = self.lists()
        rows = len(lists["input_ids"])
        seq = len(lists["input_ids"][0])
        bad = self.rng.choice(["1e309", "-1e309", str(2**64), str(-(2**70)), "1" * 400, "NaN", "Infinity", "-0.5",
                               "9223372036854775808", "1e-400"])
        ids = "[" + ",".join("[" + ",".join([bad] * seq) + "]" for _ in range(rows)) + "]"
        body = self.body({**lists, "input_ids": "@"}).replace(b'"@"', ids.encode())
        return Case("huge_numbers", http(INFER, body), frozenset({422}))

    def deep_nesting(self) -> Case:
        r = self.rng
        depth = r.choice([40, 900, 5_000, 100_000, 300_000])
        if r.random() < 0.5:
            nested = "[" * depth + "1" + "]" * depth
        else:  # 6 bytes a level: at most 100,000 levels stay under the 1 MiB body limit
            nested = '{"a":' * min(depth, 100_000) + "1" + "}" * min(depth, 100_000)
        body = ('{"inputs": {"input_ids": ' + nested + "}}").encode()
        return Case("deep_nesting", http(INFER, body), frozenset({400, 422}))

    def bad_npz(self) -> Case:
        r, base = self.rng, self.base()
        valid = npz(**base)
        body = r.choice([  # built only once chosen: the bomb takes ~40 ms to compress
            lambda: valid[: r.randrange(len(valid))],  # truncated: the zip's directory is at its end
            lambda: b"PK\x05\x06" + r.randbytes(r.randrange(1, 200)),
            lambda: r.randbytes(r.randrange(0, 3000)),
            lambda: b"XXXX" + valid[4:],  # the first member's local header magic
            lambda: npz(**{**base, "input_ids": np.array([{"x": 1}], dtype=object)}),
            lambda: npz(**{**base, "input_ids": base["input_ids"].astype(np.float32)}),
            lambda: npz(**{**base, "input_ids": base["input_ids"].astype(np.int32)}),
            lambda: npz(**{k + "_x": v for k, v in base.items()}),
            lambda: npz_bomb(r),
        ])()
        ctype = r.choice([N, N, "application/octet-stream"])
        return Case("bad_npz", http(INFER, body, ctype), frozenset({400, 413, 422}))

    def wrong_content_type(self) -> Case:
        r = self.rng
        ctype = r.choice(["text/plain", "application/xml", "multipart/form-data; boundary=x", "application/jsonx",
                          "json", "", None, "application/x-www-form-urlencoded", "x" * 3000, "application/npz",
                          "".join(r.choice("abc/;=+- ") for _ in range(r.randrange(1, 40)))])
        return Case("wrong_content_type", http(INFER, self.body(self.lists()), ctype), frozenset({415}))

    def kserve(self) -> Case:
        """KServe v2 bodies broken in one place: datatype, shape, data, binary sizes, the header length."""
        r, base = self.rng, self.base()
        entries = [{"name": k, "shape": list(v.shape), "datatype": "INT64", "data": v.ravel().tolist()}
                   for k, v in base.items()]
        e = r.choice(entries)
        raw = b"".join(v.tobytes() for v in base.values())
        binary = [{**{k: v for k, v in x.items() if k != "data"}, "parameters": {"binary_data_size": len(x["data"]) * 8}}
                  for x in entries]
        op = r.randrange(9)
        e.update([{"datatype": r.choice(["FP32", "BYTES", "INT32", None, 7, "int64"])}, {"shape": [3, -1]},
                  {"shape": r.choice(["1x2", None, [1.5], [True], [1 << 62, 1 << 62]])},
                  {"data": e["data"][:-1]}, {"data": [[1, 2], [3]]}, {"data": ["a"] * len(e["data"])}]
                 [op] if op < 6 else {})
        doc = {"inputs": binary if op >= 6 else entries, "outputs": r.choice([None, [{"name": "nope"}], [1], "x"])}
        if doc["outputs"] is None:
            del doc["outputs"]
        head = json.dumps(doc).encode()
        length = [len(head), len(head) + len(raw) + 5, len(head) - 3][op - 6] if op >= 6 else None
        payload = head + (raw[:-r.randrange(1, 9)] if op == 6 else raw) if op >= 6 else head
        extra = (f"Inference-Header-Content-Length: {length}",) if length is not None else ()
        ctype = r.choice([None, J, "application/octet-stream"]) if op >= 6 else r.choice([None, J])
        return Case("kserve", http(INFER, payload, ctype, extra=extra), frozenset({400, 422}))

    def unknown_model(self) -> Case:
        r = self.rng
        name = r.choice(["nope", "..", "%2e%2e", "BERT", "bert%20", "%F0%9F%98%80", "a" * 2000, "bert-copy",
                         "%00", "bert%2Finfer", "".join(r.choice("abcxyz-_.~0123456789") for _ in range(12))])
        return Case("unknown_model", http(f"/v2/models/{name}/infer", self.body(self.lists())), frozenset({404}))

    def bad_outputs(self) -> Case:
        r = self.rng
        query = r.choice([",,,", "", "%20", "nope", "pooler_output,nope", "x" * 3000, ",".join(["y"] * 500),
                          "%00", "%F0%9F%98%80", "POOLER_OUTPUT", "last_hidden_state%2Cnope",
                          "".join(r.choice("abc,_ ") for _ in range(r.randrange(1, 30))).replace(" ", "%20") + "q"])
        return Case("bad_outputs", http(f"{INFER}?outputs={query}", self.body(self.lists())), frozenset({422}))

    def oversized_header(self) -> Case:
        size = self.rng.choice([1 << 20, 2 << 20, 4 << 20])
        request = http("/v2/health/live", method="GET", extra=(f"X-Pad: {'p' * size}",))
        return Case("oversized_header", request, frozenset({400}), silent_ok=True)

    def truncated_body(self) -> Case:
        body = self.body(self.lists())
        cut = body[: self.rng.randrange(len(body))]
        if self.rng.random() < 0.9:  # the client hangs up: nobody is left to answer
            return Case("truncated_hang_up", http(INFER, cut, length=len(body)), frozenset(), True, True)
        return Case("truncated_stall", http(INFER, cut, length=len(body)), frozenset({408}))

    def bad_shapes(self) -> Case:
        r, lists = self.rng, self.lists()
        ids = lists["input_ids"]
        variants = [
            {k: [v[0]] * 17 for k, v in lists.items()},  # 17 rows, the engine's max is 16
            {k: [row * 20 for row in v] for k, v in lists.items()},  # sequences of 80 and more, past 64
            {k: [] for k in lists}, {k: [[]] for k in lists}, {k: [[[1]]] for k in lists},
            {k: 1 for k in lists}, {**lists, "attention_mask": [row + [1] for row in ids]},
            {**lists, "input_ids": [ids[0]] * (len(ids) + 1)},
        ]
        if r.random() < 0.3:
            shape = r.choice([(-1, 8), (10**12, 8), (2, -3), (2**40,)])
            return Case("bad_shapes", http(INFER, npy_member(shape), N), frozenset({400}))
        return Case("bad_shapes", http(INFER, self.body(r.choice(variants))), frozenset({400, 422}))

    def bad_http(self) -> Case:
        r, body = self.rng, self.body(self.lists())
        request = r.choice([
            b"GARBAGE\r\n\r\n", b"POST " + INFER.encode() + b" HTTP/9.9\r\nHost: x\r\n\r\n",
            http(INFER, body, length=-5), http(INFER, body).replace(b"Content-Length: ", b"Content-Length: x"),
            http(INFER, body, extra=("Transfer-Encoding: chunked",)),
            (f"POST {INFER} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: {J}\r\n"
             "Transfer-Encoding: chunked\r\n\r\nzz\r\n").encode(),
            b"POST /v2/models/bert/infer HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
        ])
        # h11 reads HTTP/9.9 as a version it accepts (415 then: no Content-Type), and waits for the end of a
        # chunk-size line that never comes (408)
        return Case("bad_http", request, frozenset({400, 408, 415}), silent_ok=True)

    def too_large(self) -> Case:
        if self.rng.random() < 0.5:
            return Case("too_large", http(INFER, b"[" * (MAX_BODY + 1 + self.rng.randrange(1000))), frozenset({413}))
        return Case("too_large", http(INFER, b"{}", length=100 * MAX_BODY), frozenset({413}))

    def wrong_route(self) -> Case:
        r = self.rng
        path, method = r.choice([(INFER, "GET"), ("/v2/models", "POST"), ("/v2/health/live", "POST"),
                                 ("/nowhere", "GET"), ("/v2/models/bert/infer/x", "POST"), (INFER, "PUT")])
        return Case("wrong_route", http(path, b"{}") if method == "POST" else http(path, method=method),
                    frozenset({404, 405}))

    def large_json(self) -> Case:
        """Bodies over offload.LARGE_JSON_BYTES, decoded in the worker process: its errors must come back
        with their own status."""
        r = self.rng
        rows = r.randrange(3_000, 7_000)  # 1.3-3.1 MB; more than 16 rows, so never valid
        ids, mask = (",".join([json.dumps(row)] * rows) for row in (list(range(1, 65)), [1] * 64))
        body = f'{{"inputs": {{"input_ids": [{ids}], "attention_mask": [{mask}]}}}}'.encode()
        variant = r.randrange(3)
        if variant == 0:
            return Case("large_json", http(INFER, body), frozenset({422}))
        if variant == 1:
            return Case("large_json", http(INFER, body[: -r.randrange(1, 1000)]), frozenset({400}))
        return Case("large_json", http(INFER, body.replace(b"64]", b"6.5]")), frozenset({422}))

    def valid(self) -> Case:
        return Case("valid", http(INFER, self.body(self.lists())), frozenset({200}))


def npz_bomb(r: random.Random) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("input_ids.npy", b"\0" * (MAX_BODY * r.choice([2, 8])))  # declares more than the limit
    return out.getvalue()


WEIGHTS = {"broken_json": 14, "wrong_types": 10, "huge_numbers": 7, "deep_nesting": 5, "bad_npz": 12,
           "wrong_content_type": 8, "unknown_model": 7, "bad_outputs": 8, "oversized_header": 1, "truncated_body": 6,
           "bad_shapes": 9, "bad_http": 4, "too_large": 2, "wrong_route": 3, "large_json": 2, "kserve": 8, "valid": 4}


def plan(valid: list[dict[str, np.ndarray]], seed: int = SEED, total: int = TOTAL) -> list[Case]:
    rng = random.Random(seed)
    gen = Generator(rng, valid)
    kinds = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()), k=total)
    return [getattr(gen, kind)() for kind in kinds]


async def send(host: str, port: int, case: Case) -> int | None:
    """The answer's status, or None when the connection closed without one."""
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return -1
    try:
        writer.write(case.request)
        await writer.drain()
        if case.hang_up:
            return None
        data = await asyncio.wait_for(reader.read(), 30)
    except (ConnectionError, OSError):
        data = b""
    finally:
        writer.close()
    if not data.startswith(b"HTTP/1.1 "):
        return None
    return int(data.split(b" ", 2)[1])


def run_all(url: str, cases: list[Case]) -> list[int | None]:
    host, port = url.removeprefix("http://").split(":")

    async def main() -> list[int | None]:
        limit = asyncio.Semaphore(CONCURRENCY)

        async def one(case: Case) -> int | None:
            async with limit:
                return await send(host, int(port), case)

        return await asyncio.gather(*(one(c) for c in cases))

    return asyncio.run(main())


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_thousands_of_malformed_requests_get_4xx_and_the_server_stays_healthy_and_bounded(bert_bundle):
    with runtimes.load(bert_bundle) as r:
        valid = [generate_feeds(r.manifest.io, {"batch": 1 + i % 3, "sequence": 4 + 3 * i}, seed=i) for i in range(6)]
        check = valid[0]
        want = r.infer(check)
    cases = plan(valid)
    with serve_process([ENGINEKIT, "serve", str(bert_bundle), "--port", "0", "--max-body-mb", "4",
                        "--body-timeout-s", "1", "--threads", "1"]) as s:
        pid = s.proc.pid
        run_all(s.url, plan(valid, seed=SEED + 1, total=300))  # warm: first-use allocations are not growth
        rss_before = rss_mib(pid)
        kids_before = sum(rss_mib(k) for k in children(pid))
        t0 = time.monotonic()
        statuses = run_all(s.url, cases)
        seconds = time.monotonic() - t0
        rss_after = rss_mib(pid)
        kids_after = sum(rss_mib(k) for k in children(pid))
        live = httpx.get(f"{s.url}/v2/health/live", timeout=10)
        req = make_request("bert", check, "npz")
        answer = httpx.post(s.url + req.path, content=req.body, headers={"content-type": req.content_type}, timeout=30)
        metrics = scrape(s.url)
        alive = s.proc.poll() is None
        time.sleep(0.2)  # let the output pump read the last lines
        log = "".join(s.lines)
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    failures = []
    for i, (case, status) in enumerate(zip(cases, statuses)):
        counts[case.kind][status] += 1
        if not (status in case.allowed or (status is None and case.silent_ok)):
            failures.append(f"#{i} {case.kind}: got {status}, allowed {sorted(case.allowed)}: {case.request[:160]!r}")
    print(f"\nfuzz: {len(cases)} requests (seed {SEED}) in {seconds:.1f} s, {CONCURRENCY} at a time")
    for kind in sorted(counts):
        print(f"  {kind:20} {sum(counts[kind].values()):5}  " +
              ", ".join(f"{k if k is not None else 'no answer'}: {v}" for k, v in sorted(
                  counts[kind].items(), key=lambda kv: -1 if kv[0] is None else kv[0])))
    print(f"  server RSS {rss_before:.1f} -> {rss_after:.1f} MiB (+{rss_after - rss_before:.1f}); codec worker "
          f"processes {kids_before:.1f} -> {kids_after:.1f} MiB")
    assert failures == [], "\n".join(failures[:10])
    assert not any(s is not None and s >= 500 for s in statuses)
    assert alive and live.status_code == 200
    assert answer.status_code == 200
    got = decode_response(answer.content, answer.headers["content-type"])
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert not any(k.startswith("enginekit_requests_total{code=\"5") for k in metrics), metrics
    assert "Traceback" not in log and "failed" not in log, log[-3000:]
    assert rss_after - rss_before < RSS_GROWTH_LIMIT_MIB and kids_after - kids_before < RSS_GROWTH_LIMIT_MIB
