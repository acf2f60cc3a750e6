"""The batching core without HTTP: grouping, delays, limits, failure isolation, draining; and on the
real tiny BERT engine, batched results bit-identical to running each request alone."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

import runtimes
from runtimes.errors import InvalidInput
from runtimes.samples import generate_feeds
from runtimes.serve import DynamicBatcher, Overloaded, batch_dim


class FakeEngine:
    """Doubles its input; records the rows of every run; refuses any value < 0 like an engine would."""

    def __init__(self, delay: float = 0.0):
        self.runs: list[int] = []
        self.delay = delay
        self.threads: set[int] = set()

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.threads.add(threading.get_ident())
        time.sleep(self.delay)
        x = feeds["x"]
        if (x < 0).any():
            raise InvalidInput("negative values refused")
        self.runs.append(len(x))
        return {"y": x * 2}


def rows(n: int, width: int = 4, value: float = 1.0) -> dict[str, np.ndarray]:
    return {"x": np.full((n, width), value, np.float32)}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def started(engine: FakeEngine, **kw) -> DynamicBatcher:
    b = DynamicBatcher(engine, **{"max_batch": 8, "max_delay_s": 0.05, **kw})
    b.start()
    return b


def test_concurrent_requests_share_runs_and_get_their_own_rows():
    async def main() -> None:
        engine = FakeEngine()
        b = await started(engine)
        outs = await asyncio.gather(*(b.submit(rows(1, value=i)) for i in range(20)))
        await b.close()
        for i, out in enumerate(outs):
            np.testing.assert_array_equal(out["y"], np.full((1, 4), 2 * i, np.float32))
        assert engine.runs == [8, 8, 4]  # full batches run at once, the rest after the delay

    run(main())


def test_different_shapes_never_share_a_run():
    async def main() -> None:
        engine = FakeEngine()
        b = await started(engine, max_delay_s=0.01)
        outs = await asyncio.gather(*(b.submit(rows(1, width=3 + i % 3, value=i)) for i in range(9)))
        await b.close()
        assert sorted(engine.runs) == [3, 3, 3]
        for i, out in enumerate(outs):
            assert out["y"].shape == (1, 3 + i % 3) and out["y"][0, 0] == 2 * i

    run(main())


def test_a_lone_request_waits_at_most_the_delay_and_zero_delay_runs_at_once():
    async def main(delay: float) -> float:
        b = await started(FakeEngine(), max_delay_s=delay)
        t0 = time.perf_counter()
        await b.submit(rows(1))
        await b.close()
        return time.perf_counter() - t0

    assert 0.09 <= run(main(0.1)) < 2.0
    assert run(main(0.0)) < 0.05


def test_batches_never_exceed_max_rows_and_an_oversized_request_runs_alone():
    async def main() -> None:
        engine = FakeEngine()
        b = await started(engine, max_batch=4)
        await asyncio.gather(*(b.submit(rows(n)) for n in (3, 3, 2, 6, 1)))
        await b.close()
        assert 6 in engine.runs and sum(engine.runs) == 15
        assert all(r <= 4 for r in engine.runs if r != 6)

    run(main())


def test_a_refused_request_fails_alone_and_its_batch_mates_succeed():
    async def main() -> None:
        b = await started(FakeEngine())
        results = await asyncio.gather(*(b.submit(rows(1, value=-1 if i == 3 else i)) for i in range(8)),
                                       return_exceptions=True)
        await b.close()
        assert isinstance(results[3], InvalidInput)
        assert all(isinstance(r, dict) for i, r in enumerate(results) if i != 3)

    run(main())


def test_full_queue_and_shutdown_answer_overloaded():
    async def main() -> None:
        b = await started(FakeEngine(delay=0.05), max_batch=1, max_queue=2)
        tasks = [asyncio.ensure_future(b.submit(rows(1))) for _ in range(6)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert any(isinstance(r, Overloaded) for r in results) and any(isinstance(r, dict) for r in results)
        await b.close()
        with pytest.raises(Overloaded, match="shutting down"):
            await b.submit(rows(1))

    run(main())


def test_close_drains_queued_requests_without_waiting_for_the_delay():
    async def main() -> None:
        engine = FakeEngine()
        b = await started(engine, max_delay_s=30.0)
        tasks = [asyncio.ensure_future(b.submit(rows(1))) for _ in range(3)]
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        await b.close()
        assert time.perf_counter() - t0 < 5 and all(t.done() and not t.exception() for t in tasks)
        assert engine.runs == [3]

    run(main())


def test_cancelled_requests_are_skipped():
    async def main() -> None:
        engine = FakeEngine()
        b = await started(engine, max_delay_s=0.05)
        gone = asyncio.ensure_future(b.submit(rows(1)))
        kept = asyncio.ensure_future(b.submit(rows(1)))
        await asyncio.sleep(0)
        gone.cancel()
        assert (await kept)["y"].shape == (1, 4)
        await b.close()
        assert engine.runs == [1]

    run(main())


def test_engine_runs_happen_in_the_given_executor_and_never_overlap():
    from concurrent.futures import ThreadPoolExecutor

    async def main() -> None:
        engine = FakeEngine(delay=0.002)
        with ThreadPoolExecutor(1) as pool:
            b = await started(engine, executor=pool, max_batch=2, max_delay_s=0)
            await asyncio.gather(*(b.submit(rows(1)) for _ in range(10)))
            await b.close()
        assert len(engine.threads) == 1 and sum(engine.runs) == 10

    run(main())


def test_batched_results_are_bit_identical_to_unbatched_on_the_real_engine(bert_bundle):
    """Mixed sequence lengths and row counts, submitted at once: every answer equals that request run alone."""
    with runtimes.load(bert_bundle) as r:
        assert batch_dim(r.manifest.io) == "batch"
        requests = [generate_feeds(r.manifest.io, {"batch": 1 + (i // 3) % 2, "sequence": (8, 17, 64)[i % 3]}, seed=i)
                    for i in range(24)]
        alone = [r.infer(f) for f in requests]
        per_run: list[int] = []

        async def main() -> list[dict[str, np.ndarray]]:
            b = DynamicBatcher(r.infer, max_batch=16, max_delay_s=0.05,
                               on_batch=lambda _rows, reqs, _s: per_run.append(reqs))
            b.start()
            outs = await asyncio.gather(*(b.submit(r.validate(f)) for f in requests))
            await b.close()
            return outs

        batched = run(main())
    assert len(per_run) < len(requests) and max(per_run) > 1  # batching did happen
    for want, got in zip(alone, batched):
        for name in want:
            assert np.array_equal(want[name], got[name]), name
