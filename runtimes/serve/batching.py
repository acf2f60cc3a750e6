"""Dynamic batching, independent of HTTP: concurrent requests in, one engine run per batch out.

    batcher = DynamicBatcher(runner.infer, max_batch=16, max_delay_s=0.002)
    batcher.start()                       # inside a running event loop
    outputs = await batcher.submit(feeds) # rows of this request only; many callers at once

Policy. Requests are grouped by the shape of their non-batch dims (and dtypes): only requests whose
inputs agree on every axis but the batch axis share an engine run. Mismatched sequence lengths are
not padded, because padding is only safe with knowledge a manifest does not carry: which input is
a mask, which outputs follow the padded axis and must be cut back, whether the model pools over
padding. Grouping by shape is correct for every model, and on ONNX Runtime's CPU provider it gives
results bit-identical to running each request alone (tests/runtimes/test_serve_batching.py checks
it). Clients that see many distinct lengths batch better if they pad to a few lengths themselves,
where they know the semantics (e.g. a tokenizer's `pad_to_multiple_of=16`).

A group runs when it holds `max_batch` rows, or when its oldest request has waited `max_delay_s`
(0: run as soon as the engine is free). Among ready groups the one with the oldest request runs
first. One engine run at a time per batcher: while it runs, new requests queue and form the next
batch, which is where batching under load comes from. A request larger than `max_batch` rows runs
alone (the engine's own range is checked by Runner.validate before it gets here).

If a batch of several requests fails, each is re-run alone, so one request with values the engine
refuses (say a token id beyond the vocabulary) fails by itself and its batch-mates still succeed.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from ..errors import EnginekitError

RunFn = Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]
# rows, requests, seconds of one engine run (the service feeds its metrics from it)
BatchHook = Callable[[int, int, float], None]


class Overloaded(EnginekitError):
    """The batcher's queue is full or it is shutting down; the client should retry later (HTTP 503)."""


@dataclass
class _Pending:
    feeds: dict[str, np.ndarray]
    rows: int
    future: asyncio.Future[dict[str, np.ndarray]]
    arrived: float


@dataclass
class _Group:
    queue: deque[_Pending] = field(default_factory=deque)
    rows: int = 0


class DynamicBatcher:
    """Batches `submit()` calls into `run(feeds)` calls; see the module docstring for the policy.

    batched: False when the engine has no batch axis shared by all inputs and outputs; then every
    request runs alone. max_queue: requests waiting before `submit` raises Overloaded (default
    1024). executor: where `run` is called (default: the loop's default executor); give it one
    thread so engine runs never overlap.
    """

    def __init__(self, run: RunFn, *, max_batch: int, max_delay_s: float, batched: bool = True,
                 max_queue: int = 1024, executor: Executor | None = None, on_batch: BatchHook | None = None):
        if max_batch < 1 or max_delay_s < 0 or max_queue < 1:
            raise ValueError(f"need max_batch >= 1, max_delay_s >= 0, max_queue >= 1; got {max_batch}, "
                             f"{max_delay_s}, {max_queue}")
        self._run_fn = run
        self.max_batch = max_batch if batched else 1
        self.max_delay_s = max_delay_s
        self.batched = batched
        self.max_queue = max_queue
        self._executor = executor
        self._on_batch = on_batch
        self._groups: dict[Hashable, _Group] = {}
        self._pending = 0
        self._closing = False
        self._wake = asyncio.Event()  # binds to a loop on first use (Python >= 3.10)
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Requests queued and not yet handed to the engine."""
        return self._pending

    def start(self) -> None:
        """Start the worker task on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._work(), name="enginekit-batcher")

    async def close(self) -> None:
        """Stop taking requests, run every queued one (no more waiting for batch-mates), then stop."""
        self._closing = True
        if self._task is not None:
            self._wake.set()
            await self._task

    async def submit(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Queue one request of validated feeds; returns its own rows of the outputs."""
        if self._task is None:
            raise RuntimeError("DynamicBatcher.start() was not called")
        if self._closing:
            raise Overloaded("Expected a running service, but it is shutting down and takes no new requests. "
                             "Retry against another instance, or after the restart.")
        if self._pending >= self.max_queue:
            raise Overloaded(f"Expected room in the queue, but {self._pending} requests are already waiting "
                             f"(max_queue {self.max_queue}). Retry after a short back-off, or add instances.")
        loop = asyncio.get_running_loop()
        rows = int(next(iter(feeds.values())).shape[0]) if self.batched and feeds else 1
        key: Hashable = (tuple((n, a.shape[1:], a.dtype.str) for n, a in sorted(feeds.items()))
                         if self.batched else object())
        pending = _Pending(feeds, rows, loop.create_future(), time.monotonic())
        group = self._groups.setdefault(key, _Group())
        group.queue.append(pending)
        group.rows += rows
        self._pending += 1
        self._wake.set()
        return await pending.future

    # -- the worker ---------------------------------------------------------------------------------
    async def _work(self) -> None:
        while True:
            batch = self._take_ready()
            if batch:
                await self._run(batch)
                continue
            if self._closing and not self._pending:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self._until_next_deadline())
            except asyncio.TimeoutError:
                pass

    def _until_next_deadline(self) -> float | None:
        heads = [g.queue[0].arrived for g in self._groups.values() if g.queue]
        return max(0.0, min(heads) + self.max_delay_s - time.monotonic()) if heads else None

    def _take_ready(self) -> list[_Pending]:
        """Pop the next batch: the ready group with the oldest request, up to max_batch rows."""
        now, best = time.monotonic(), None
        for key, g in list(self._groups.items()):
            while g.queue and g.queue[0].future.done():  # the client went away (request cancelled)
                self._drop(g, g.queue.popleft())
            if not g.queue:
                del self._groups[key]
                continue
            ready = self._closing or g.rows >= self.max_batch or now - g.queue[0].arrived >= self.max_delay_s
            if ready and (best is None or g.queue[0].arrived < best.queue[0].arrived):
                best = g
        if best is None:
            return []
        batch: list[_Pending] = []
        rows = 0
        while best.queue and (not batch or rows + best.queue[0].rows <= self.max_batch):
            p = best.queue.popleft()
            self._drop(best, p)
            if not p.future.done():
                batch.append(p)
                rows += p.rows
        return batch

    def _drop(self, group: _Group, p: _Pending) -> None:
        group.rows -= p.rows
        self._pending -= 1

    async def _run(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        if len(batch) == 1:
            feeds = batch[0].feeds
        else:
            feeds = {n: np.concatenate([p.feeds[n] for p in batch], axis=0) for n in batch[0].feeds}
        rows = sum(p.rows for p in batch)
        t0 = time.perf_counter()
        try:
            outputs = await loop.run_in_executor(self._executor, self._run_fn, feeds)
            if len(batch) > 1 and any(v.shape[:1] != (rows,) for v in outputs.values()):
                raise RuntimeError(f"engine returned outputs whose first axis is not the batch of {rows} rows: "
                                   f"{ {k: v.shape for k, v in outputs.items()} }")
        except Exception as exc:
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(exc)
                return
            for p in batch:  # isolate the request the engine refuses; its batch-mates still succeed
                await self._run([p])
            return
        if self._on_batch is not None:
            self._on_batch(rows, len(batch), time.perf_counter() - t0)
        offset = 0
        for p in batch:
            if not p.future.done():
                p.future.set_result(dict(outputs) if len(batch) == 1
                                    else {k: v[offset:offset + p.rows] for k, v in outputs.items()})
            offset += p.rows
