"""Load-test `enginekit serve`: start it on a bundle (loopback only), drive it at several concurrency
levels with a real HTTP client, and report throughput, latency percentiles and the batch sizes the
service formed (from its own /metrics).

    python bench/loadtest.py engines/all-minilm-l6-v2-ort-fp32 --concurrency 1,8,32 --requests 1000 \\
        --max-batch auto,1 --out bench/results/serve_cpu

Requests are one row each at the sequence lengths of --seq (random token ids from the manifest's value
hints), JSON or .npz (--format), asking for the smallest output only (?outputs=) so the client's own
JSON work stays small. The tests (tests/runtimes/test_serve_http.py) reuse `serve_process` and
`run_load` from here.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(r"ready on (http://127\.0\.0\.1:\d+)")


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    url: str
    lines: list[str] = field(default_factory=list)  # stdout, as read so far

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful: in-flight requests finish), then SIGKILL if it has not exited in `timeout`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


@contextmanager
def serve_process(command: Sequence[str], *, ready_timeout: float = 90.0, env: dict[str, str] | None = None,
                  cwd: Path = ROOT) -> Iterator[ServerProcess]:
    """Run a server command that prints `ready on http://127.0.0.1:PORT`; stop it on exit. env: the
    server's environment (default: this one, with the checkout on PYTHONPATH); cwd: where it runs."""
    env = dict(os.environ, PYTHONPATH=str(ROOT)) if env is None else dict(env)
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    server = ServerProcess(proc, "")
    deadline = time.monotonic() + ready_timeout
    try:
        while not server.url:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"server not ready in {ready_timeout} s: {''.join(server.lines)[-2000:]}") from None
            if line is None:
                raise RuntimeError(f"server exited ({proc.wait()}): {''.join(server.lines)[-2000:]}")
            server.lines.append(line)
            if m := READY.search(line):
                server.url = m.group(1)

        def collect() -> None:
            while (line := lines.get()) is not None:
                server.lines.append(line)

        threading.Thread(target=collect, daemon=True).start()
        yield server
    finally:
        server.stop()


@dataclass
class Request:
    path: str  # e.g. /v2/models/bert/infer?outputs=pooler_output
    body: bytes
    content_type: str


def make_request(model: str, feeds: dict[str, np.ndarray], fmt: str = "json", outputs: Sequence[str] = ()) -> Request:
    query = f"?outputs={','.join(outputs)}" if outputs else ""
    if fmt == "npz":
        buf = io.BytesIO()
        np.savez(buf, **feeds)  # type: ignore[arg-type]  # numpy's stub reads **kwds as allow_pickle
        return Request(f"/v2/models/{model}/infer{query}", buf.getvalue(), "application/x-npz")
    body = json.dumps({"inputs": {k: v.tolist() for k, v in feeds.items()}}).encode()
    return Request(f"/v2/models/{model}/infer{query}", body, "application/json")


def decode_response(content: bytes, content_type: str) -> dict[str, np.ndarray]:
    if content_type.startswith("application/x-npz"):
        with np.load(io.BytesIO(content), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    return {k: np.asarray(v, dtype=np.float32) for k, v in json.loads(content)["outputs"].items()}


@dataclass
class LoadResult:
    seconds: float
    latencies: list[float]
    statuses: list[int]
    failures: list[str]  # what `check` or the transport reported, one line per failed request

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies) * 1000
        ok = sum(1 for s in self.statuses if s == 200)
        return {"requests": len(self.statuses), "ok": ok, "failed": len(self.failures),
                "seconds": round(self.seconds, 3), "throughput_rps": round(len(self.statuses) / self.seconds, 1),
                **{f"p{q}_ms": round(float(np.percentile(lat, q)), 2) for q in (50, 90, 99)}}


def run_load(url: str, requests: Sequence[Request], *, total: int, concurrency: int,
             check: Callable[[int, Any], str | None] | None = None, timeout: float = 60.0) -> LoadResult:
    """Send `total` requests (cycling through `requests`) from `concurrency` clients at once.

    check(i, response) returns None if request i's response is right, else a line saying why."""
    import httpx

    async def main() -> LoadResult:
        counter = iter(range(total))
        latencies: list[float] = []
        statuses: list[int] = []
        failures: list[str] = []
        # One client (one keep-alive connection) per worker, as separate callers would have: httpx's
        # shared pool costs the load generator ~3x the CPU per request at 32 connections.
        async def worker() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
                for i in counter:
                    req = requests[i % len(requests)]
                    t0 = time.perf_counter()
                    try:
                        r = await client.post(req.path, content=req.body, headers={"content-type": req.content_type})
                    except httpx.HTTPError as exc:
                        statuses.append(-1)
                        failures.append(f"request {i}: {type(exc).__name__}: {exc}")
                        continue
                    latencies.append(time.perf_counter() - t0)
                    statuses.append(r.status_code)
                    problem = check(i, r) if check else (None if r.status_code == 200 else r.text[:200])
                    if problem:
                        failures.append(f"request {i}: {r.status_code} {problem}")

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return LoadResult(time.perf_counter() - t0, latencies, statuses, failures)

    return asyncio.run(main())


def scrape(url: str) -> dict[str, float]:
    """The service's /metrics as {'name{labels}': value} (comments dropped)."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines() if line and line[0] != "#")}


def batch_stats(before: dict[str, float], after: dict[str, float], model: str) -> dict[str, float]:
    """Engine runs and mean rows per run between two scrapes."""
    def delta(name: str) -> float:
        key = f'{name}{{model="{model}"}}'
        return after.get(key, 0.0) - before.get(key, 0.0)

    runs = delta("enginekit_batch_size_count")
    return {"engine_runs": int(runs), "mean_batch_rows": round(delta("enginekit_batch_size_sum") / runs, 2) if runs else 0.0}


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    import onnxruntime  # type: ignore[import-untyped]

    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
            # other work on the machine moves these numbers: the 1-minute load average when the run began
            "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    ap.add_argument("--requests", type=int, default=2000, help="requests per concurrency level")
    ap.add_argument("--seq", default="16,32", help="sequence lengths the requests cycle through")
    ap.add_argument("--format", choices=("json", "npz"), default="json")
    ap.add_argument("--max-delay-ms", type=float, default=2.0)
    ap.add_argument("--max-batch", default="auto", help="comma-separated; one server run each ('auto': the engine's max, "
                    "1: no batching)")
    ap.add_argument("--threads", type=int, default=None, help="ORT intra-op threads in the server")
    ap.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from runtimes.manifest import Manifest
    from runtimes.samples import generate_feeds
    from runtimes.serve import batch_dim

    manifest = Manifest.read(args.bundle)
    io_spec = manifest.io
    smallest = min(io_spec.outputs, key=lambda s: len(s.shape)).name
    seqs = [int(s) for s in args.seq.split(",")]
    seq_dim = next((d for s in io_spec.inputs for d in s.shape[1:] if isinstance(d, str)), None)
    sizes = {name: r.opt for name, r in io_spec.dims.items()}
    if (batch := batch_dim(io_spec)) is not None:
        sizes[batch] = 1
    requests = [make_request(manifest.name, generate_feeds(io_spec, {**sizes, **({seq_dim: L} if seq_dim else {})},
                                                           seed=i), args.format, [smallest])
                for i, L in enumerate(seqs * 8)]
    runs, host = [], machine()  # before the load, for its load average
    for max_batch in args.max_batch.split(","):
        server_cmd = [sys.executable, "-m", "exporter", "serve", str(args.bundle), "--port", "0",
                      "--max-delay-ms", str(args.max_delay_ms)]
        server_cmd += (["--max-batch", max_batch] if max_batch != "auto" else []) + \
            (["--threads", str(args.threads)] if args.threads else [])
        levels = []
        with serve_process(server_cmd) as server:
            run_load(server.url, requests, total=100, concurrency=4)  # warm the client and the server's caches
            for c in (int(x) for x in args.concurrency.split(",")):
                before = scrape(server.url)
                result = run_load(server.url, requests, total=args.requests, concurrency=c)
                level = {"concurrency": c, **result.summary(), **batch_stats(before, scrape(server.url), manifest.name)}
                levels.append(level)
                print(json.dumps({"max_batch": max_batch, **level}), flush=True)
        runs.append({"server": shlex.join(["enginekit", *server_cmd[3:]]), "max_batch": max_batch, "levels": levels})
    report = {"command": shlex.join(["python", "bench/loadtest.py", *(argv or sys.argv[1:])]), "bundle": manifest.name,
              "bundle_built_by": manifest.rebuild_command,
              "inputs": f"1 row per request, {seq_dim} in {seqs}, {args.format}, ?outputs={smallest}",
              "machine": host, "runs": runs}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(to_markdown(report))


def to_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    text = (f"# enginekit serve on the CPU: {report['bundle']}\n\n"
            f"Produced by `{report['command']}`. It starts the server below on 127.0.0.1 and drives it with httpx\n"
            f"clients on the same machine ({report['inputs']}). The bundle was built by `{report['bundle_built_by']}`.\n\n"
            f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}, Python {m['python']}, "
            f"onnxruntime {m['onnxruntime']}; 1-minute load average {m['load_average_1min']} when it began. The load\n"
            "generator shares the cores with the server.\n")
    for run in report["runs"]:
        rows = "\n".join(f"| {lv['concurrency']} | {lv['requests']} | {lv['failed']} | {lv['throughput_rps']} | "
                         f"{lv['p50_ms']} | {lv['p99_ms']} | {lv['mean_batch_rows']} |" for lv in run["levels"])
        text += (f"\n`{run['server']}`\n\n"
                 "| clients | requests | failed | throughput (req/s) | p50 (ms) | p99 (ms) | mean rows per engine run |\n"
                 "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n" + rows + "\n")
    return text


if __name__ == "__main__":
    main()
