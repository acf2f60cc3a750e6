"""Request decoding and response encoding away from the event loop: a small thread pool, and one
worker process for large JSON.

Why not on the loop: while the loop decodes a body, no route answers, /v2/health/live included. A
52 MiB JSON body takes 1.2 s to decode (json.loads 0.82 s, then np.asarray 0.34 s; 2 Xeon cores),
and a 16x256x384 float32 output 0.93 s to encode as JSON (tolist + json.dumps, ~0.6 us a value).

Why a process for large JSON: json.loads, np.asarray on nested lists, tolist and json.dumps are C
calls that hold the GIL from start to end, so in a thread the loop still waits for them (measured:
the loop's longest pause was 0.78 s with json.loads of 52 MiB in a thread; 37 ms with it in a worker
process, the cost of moving the body across). Everything else stays in threads: JSON under 1 MiB
(about 23 ms of decoding a MiB, small enough) and all .npz work (zipfile, zlib and numpy copies,
which release the GIL or are memcpy-fast), where a process round trip (~0.4 ms) would cost more
than it saves.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

import numpy as np

from ..manifest import TensorSpec
from .batching import Overloaded
from .codec import JSON, encode_outputs, media_type
from .kserve import Decoded, KServeRequest, decode_request, encode_response

T = TypeVar("T")
LARGE_JSON_BYTES = 1 << 20  # bodies from here on decode in the worker process
LARGE_JSON_VALUES = 1 << 15  # outputs of this many values (~20 ms of encoding) and more encode there


class Codec:
    """Where bodies are decoded and answers encoded. threads: the pool for small JSON and .npz;
    processes: worker processes for large JSON (0: threads only, e.g. where spawning is not allowed)."""

    def __init__(self, threads: int = 2, processes: int = 1):
        self.threads = ThreadPoolExecutor(max(1, threads), thread_name_prefix="enginekit-codec")
        self._processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the worker processes and wait until they answer (spawn + numpy import: ~0.5 s), so
        the first large request does not pay for it. Blocking: call it from a thread."""
        if self._processes:
            pool = self._process_pool()
            for ready in [pool.submit(os.getpid) for _ in range(self._processes)]:
                ready.result()

    async def decode(self, body: bytes, content_type: str | None, specs: list[TensorSpec], *, limit: int,
                     validate: Callable[[Mapping[str, Any]], dict[str, np.ndarray]],
                     header_length: str | None = None) -> Decoded:
        """The request's feeds (any format: kserve.decode_request), checked by `validate`
        (Runner.validate), off the loop; header_length: the Inference-Header-Content-Length header."""
        loop = asyncio.get_running_loop()
        decode = functools.partial(decode_request, body, content_type, header_length, specs, limit=limit)
        if (self._processes and len(body) >= LARGE_JSON_BYTES and header_length is None
                and media_type(content_type) in (JSON, "")):
            decoded = await self._in_process(decode)
            decoded.feeds = await loop.run_in_executor(self.threads, validate, decoded.feeds)
            return decoded

        def decode_and_validate() -> Decoded:
            decoded = decode()
            decoded.feeds = validate(decoded.feeds)
            return decoded

        return await loop.run_in_executor(self.threads, decode_and_validate)

    async def encode(self, model: str, outputs: Mapping[str, np.ndarray], kind: str) -> bytes:
        encode = functools.partial(encode_outputs, model, dict(outputs), kind)
        if self._processes and kind == JSON and sum(v.size for v in outputs.values()) >= LARGE_JSON_VALUES:
            return await self._in_process(encode)
        return await asyncio.get_running_loop().run_in_executor(self.threads, encode)

    async def encode_kserve(self, model: str, outputs: Mapping[str, np.ndarray],
                            request: KServeRequest) -> tuple[bytes, int | None]:
        """A KServe response body and its JSON header's length (None: no binary outputs)."""
        encode = functools.partial(encode_response, model, dict(outputs), request)
        as_json = sum(v.size for k, v in outputs.items() if not request.binary.get(k, request.binary_all))
        if self._processes and as_json >= LARGE_JSON_VALUES:
            return await self._in_process(encode)
        return await asyncio.get_running_loop().run_in_executor(self.threads, encode)

    def close(self) -> None:
        self.threads.shutdown(wait=True)
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def _process_pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                # spawn, not fork: the service has ONNX Runtime's threads running, and a forked copy of
                # a process with threads can deadlock on a lock one of them held.
                self._pool = ProcessPoolExecutor(self._processes, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_worker_init, initargs=(os.getpid(),))
            return self._pool

    async def _in_process(self, call: Callable[[], T]) -> T:
        pool = self._process_pool()
        try:
            return await asyncio.wrap_future(pool.submit(call))
        except BrokenProcessPool:
            # The worker died (say the kernel's OOM killer took it during a huge body): a broken pool
            # refuses every later call, so the next request gets a new one.
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            pool.shutdown(wait=False)
            raise Overloaded("Expected the service's JSON worker process to answer, but it died while handling "
                             "this request (out of memory?). Retry; if it happens again, send smaller requests "
                             "or .npz bodies (Content-Type application/x-npz).") from None


def _worker_init(parent: int) -> None:
    # Ctrl+C reaches the whole process group and `systemctl stop` signals the whole cgroup, but the
    # service drains its requests in flight (some may be in this worker) and shuts the pool down itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="enginekit-parent-watch").start()


def _exit_with(parent: int) -> None:
    # A service killed with SIGKILL cannot shut its pool down, and the worker holds both ends of its
    # task pipe, so it never sees EOF: it would wait forever as an orphan (observed on Python 3.11).
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


__all__ = ["LARGE_JSON_BYTES", "LARGE_JSON_VALUES", "Codec"]
