"""Batched, cancellable generation requests over a generator that runs one batch at a time.

    batcher = LlmBatcher(generator)                # runtimes.decoding.Generator (generate_ids)
    handle = batcher.submit(prompt_ids, SamplingOptions(max_new_tokens=32), on_token=print)
    generation = handle.future.result()            # or handle.cancel() to stop it early
    batcher.close()

`submit` is the contract the OpenAI-compatible server speaks (openai_app.py): a generator with a
native `submit(prompt_ids, options, on_token) -> handle` (continuous batching, e.g. ONNX Runtime
GenAI's engine) is used as is; any other goes through this class. on_token(id) is called on the
worker thread, once per new token; handle.future is a concurrent.futures.Future[Generation] whose
finish_reason is "stop", "length" or "cancelled".

Policy. One worker thread owns the generator (its sessions are not shared between threads). When
the generator is free, the oldest waiting request starts a batch once max_batch requests wait or it
has waited max_delay_s, and every other waiting request with equal SamplingOptions joins it, up to
max_batch; they run as one `generate_ids` call. A request that arrives while a batch runs waits for
the next one (no request joins a batch in flight: the decoding loop's KV cache has a fixed batch).
Sampled requests with a seed run alone: the loop draws every row from one random stream, so a
batch-mate would change them. A cancelled request leaves its batch at the next step (the loop's
`cancel`), and the batch ends when all its rows have; one cancelled before its batch starts never runs.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import astuple, dataclass, field
from typing import Any

from ..decoding import Generation, SamplingOptions
from ..errors import EnginekitError

# batch size, seconds the generate_ids call took (the server feeds its metrics from it)
BatchHook = Callable[[int, float], None]


@dataclass
class LlmRequest:
    """One submitted request; `cancel()` is safe from any thread, any number of times."""

    prompt_ids: list[int]
    options: SamplingOptions
    on_token: Callable[[int], None]
    future: Future[Generation] = field(default_factory=Future)
    cancelled: bool = False
    arrived: float = field(default_factory=time.monotonic)
    images: list[Any] | None = None  # a VLM bundle's request: the images its placeholder runs stand for

    def cancel(self) -> None:
        self.cancelled = True


class LlmBatcher:
    """Gives `generator` (one with generate_ids(batch, options, on_token=, cancel=)) the submit() API.

    max_batch: requests per generate_ids call (default: the generator's max_batch attribute, else 1).
    max_delay_s: how long the oldest waiting request waits for batch-mates when fewer than max_batch
    wait (default 2 ms: a generation takes far longer, and clients that start together then share it).
    on_batch: called after each batch with (requests, seconds)."""

    def __init__(self, generator: Any, *, max_batch: int | None = None, max_delay_s: float = 0.002,
                 on_batch: BatchHook | None = None):
        self.generator = generator
        self.max_batch = max(1, int(max_batch or getattr(generator, "max_batch", 1) or 1))
        self.max_delay_s = max_delay_s
        self.on_batch = on_batch
        self._queue: deque[LlmRequest] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="llm-batcher", daemon=True)
        self._worker.start()

    def submit(self, prompt_ids: Sequence[int], options: SamplingOptions,
               on_token: Callable[[int], None], images: Sequence[Any] | None = None) -> LlmRequest:
        """Queue one request; images (VLM generators only): decoded HxWx3 arrays, in placeholder order."""
        request = LlmRequest([int(t) for t in prompt_ids], options, on_token, images=list(images) if images else None)
        with self._cond:
            if self._closed:
                raise EnginekitError("Expected a running generator, but it is shutting down. Retry after the restart.")
            self._queue.append(request)
            self._cond.notify()
        return request

    def close(self) -> None:
        """Stop taking requests, cancel the waiting ones, and wait for the batch in flight to end."""
        with self._cond:
            self._closed = True
            waiting = list(self._queue)
            self._queue.clear()
            self._cond.notify()
        for request in waiting:
            _finish(request, Generation(list(request.prompt_ids), [], finish_reason="cancelled"))
        self._worker.join()

    # -- the worker thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed and not self._queue:
                    return
                while not self._closed and len(self._queue) < self.max_batch:
                    left = self._queue[0].arrived + self.max_delay_s - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch = self._take()
            if batch:
                self._run_batch(batch)

    @staticmethod
    def _key(options: SamplingOptions) -> Hashable | None:
        """What batch-mates share: equal options; None for seeded sampling, which runs alone."""
        if not options.greedy and options.seed is not None:
            return None
        return tuple(tuple(v) if isinstance(v, list) else v for v in astuple(options))

    def _take(self) -> list[LlmRequest]:
        """The oldest waiting request and the waiting ones with equal options (under the lock);
        requests cancelled while waiting are finished here, without running."""
        live = []
        for request in list(self._queue):
            if request.cancelled:
                self._queue.remove(request)
                _finish(request, Generation(list(request.prompt_ids), [], finish_reason="cancelled"))
            else:
                live.append(request)
        if not live:
            return []
        key = self._key(live[0].options)
        batch = [r for r in live if key is not None and self._key(r.options) == key][:self.max_batch] or live[:1]
        for request in batch:
            self._queue.remove(request)
        return batch

    def _run_batch(self, batch: list[LlmRequest]) -> None:
        started = time.perf_counter()
        emitted = False

        def on_token(row: int, token: int) -> None:
            nonlocal emitted
            emitted = True
            batch[row].on_token(token)

        try:
            with_images = {"images": [r.images or [] for r in batch]} if any(r.images for r in batch) else {}
            results = self.generator.generate_ids([r.prompt_ids for r in batch], batch[0].options,
                                                  on_token=on_token, cancel=lambda row: batch[row].cancelled,
                                                  **with_images)
        except Exception as exc:
            if len(batch) > 1 and not emitted:  # refused before any token (a prompt too long): each alone
                for request in batch:
                    self._run_batch([request])
                return
            for request in batch:
                _fail(request, exc)
            return
        if self.on_batch is not None:
            self.on_batch(len(batch), time.perf_counter() - started)
        for request, result in zip(batch, results):
            _finish(request, result)


def _finish(request: LlmRequest, result: Generation) -> None:
    if not request.future.done():
        request.future.set_result(result)


def _fail(request: LlmRequest, exc: BaseException) -> None:
    if not request.future.done():
        request.future.set_exception(exc)


__all__ = ["BatchHook", "LlmBatcher", "LlmRequest"]
