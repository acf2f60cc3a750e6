"""runtimes/serve/llm_batcher.py over a fake generator (no engine, fast): requests waiting together with
equal options share one generate_ids call up to max_batch, different options or seeded sampling run
apart, cancellation stops a row mid-batch or keeps a waiting request from running, a batch the engine
refuses before any token is re-run request by request, and the text assembler cuts at stop strings."""

from __future__ import annotations

import threading
import time

import pytest

from runtimes.decoding import Generation, SamplingOptions
from runtimes.errors import InvalidInput
from runtimes.serve.llm_batcher import LlmBatcher
from runtimes.serve.openai_protocol import ApiError, TextAssembler, parse_request


class FakeGenerator:
    """generate_ids as runtimes.decoding.Generator's contract has it: row r emits prompt[0] + step, one token a
    step, until max_new_tokens; cancel(row) is asked before each step; a prompt of 99 is refused."""

    max_batch = 4

    def __init__(self, step_s: float = 0.0):
        self.calls: list[list[list[int]]] = []
        self.step_s = step_s
        self.gate = threading.Event()
        self.gate.set()

    def generate_ids(self, prompts, options, *, on_token=None, cancel=None):
        self.gate.wait(10)
        self.calls.append([list(p) for p in prompts])
        if any(99 in p for p in prompts):
            raise InvalidInput("Expected a prompt shorter than the engine's maximum length, found 99.")
        results = [Generation(list(p), []) for p in prompts]
        for step in range(options.max_new_tokens):
            for row, p in enumerate(prompts):
                if results[row].finish_reason == "cancelled":
                    continue
                if cancel is not None and cancel(row):
                    results[row].finish_reason = "cancelled"
                    continue
                results[row].tokens.append(p[0] + step)
                if on_token:
                    on_token(row, p[0] + step)
            time.sleep(self.step_s)
        return results


def test_waiting_requests_with_equal_options_share_a_batch_up_to_max_batch():
    gen = FakeGenerator()
    gen.gate.clear()  # the first request holds the generator while the others queue up
    sizes: list[int] = []
    batcher = LlmBatcher(gen, max_delay_s=0, on_batch=lambda n, _s: sizes.append(n))
    try:
        greedy, other = SamplingOptions(max_new_tokens=3), SamplingOptions(max_new_tokens=2)
        first = batcher.submit([1], greedy, lambda _t: None)
        time.sleep(0.05)
        seen: dict[int, list[int]] = {i: [] for i in range(7)}
        handles = [batcher.submit([10 * (i + 1)], other if i == 6 else greedy, seen[i].append) for i in range(7)]
        gen.gate.set()
        results = [h.future.result(10) for h in handles]
        assert first.future.result(10).tokens == [1, 2, 3]
    finally:
        batcher.close()
    assert [r.tokens for r in results[:6]] == [[10 * (i + 1) + s for s in range(3)] for i in range(6)]
    assert results[6].tokens == [70, 71] and all(seen[i] == results[i].tokens for i in range(7))
    # [1] alone, then 4 (max_batch) greedy ones, the 2 left, the other options apart
    assert [len(c) for c in gen.calls] == [1, 4, 2, 1] and sizes == [1, 4, 2, 1]


def test_seeded_sampling_runs_alone():
    gen = FakeGenerator()
    gen.gate.clear()
    batcher = LlmBatcher(gen, max_delay_s=0)
    try:
        opts = SamplingOptions(max_new_tokens=1, temperature=0.7, seed=3)
        handles = [batcher.submit([i + 1], opts, lambda _t: None) for i in range(3)]
        gen.gate.set()
        for h in handles:
            h.future.result(10)
    finally:
        batcher.close()
    assert [len(c) for c in gen.calls] == [1, 1, 1]


def test_cancel_stops_a_row_mid_batch_and_a_waiting_request_never_runs():
    gen = FakeGenerator(step_s=0.01)
    batcher = LlmBatcher(gen, max_delay_s=0.05)
    try:
        opts = SamplingOptions(max_new_tokens=50)
        kept, dropped = batcher.submit([1], opts, lambda _t: None), batcher.submit([2], opts, lambda _t: None)
        time.sleep(0.15)
        dropped.cancel()
        waiting = batcher.submit([3], SamplingOptions(max_new_tokens=5), lambda _t: None)
        waiting.cancel()
        gone, done = dropped.future.result(10), kept.future.result(10)
        assert gone.finish_reason == "cancelled" and 0 < len(gone.tokens) < 50
        assert done.finish_reason == "length" and len(done.tokens) == 50
        assert waiting.future.result(10).finish_reason == "cancelled" and waiting.future.result().tokens == []
    finally:
        batcher.close()
    assert [c for c in gen.calls if c == [[3]]] == []


def test_a_batch_refused_before_any_token_is_rerun_request_by_request():
    gen = FakeGenerator()
    gen.gate.clear()
    batcher = LlmBatcher(gen, max_delay_s=0)
    try:
        opts = SamplingOptions(max_new_tokens=2)
        good, bad = batcher.submit([5], opts, lambda _t: None), batcher.submit([99], opts, lambda _t: None)
        gen.gate.set()
        assert good.future.result(10).tokens == [5, 6]
        with pytest.raises(InvalidInput, match="maximum length"):
            bad.future.result(10)
    finally:
        batcher.close()


def test_text_assembler_holds_back_what_may_start_a_stop_string():
    pieces = ["Hel", "lo", " wo", "rld", "!", " End"]
    asm = TextAssembler(lambda ids: "".join(pieces[i] for i in ids), ["world", "lo w"])
    out = [asm.push(i) for i in range(len(pieces))]
    # "lo w" completes at token 2: the text is cut before it, and nothing after it is taken
    assert "".join(out) + asm.finish() == "Hel" and asm.stopped and asm.ids == [0, 1, 2]
    partial = TextAssembler(lambda ids: "ab\ufffd" if len(ids) == 1 else "abé", [])
    assert partial.push(0) == "" and partial.push(1) == "abé" and partial.finish() == ""


def test_request_fields_are_checked_with_one_paragraph():
    ok = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    assert parse_request({**ok, "max_completion_tokens": 5, "stop": "a", "extra": 1}, chat=True).max_tokens == 5
    for bad, param in (({**ok, "top_p": 0}, "top_p"), ({**ok, "stream": "yes"}, "stream"),
                       ({**ok, "seed": 1.5}, "seed"), ({**ok, "messages": []}, "messages"),
                       ({"model": "m", "prompt": 3}, "prompt")):
        with pytest.raises(ApiError) as err:
            parse_request(bad, chat="messages" in bad)
        assert err.value.status == 400 and err.value.param == param and str(err.value).startswith("Expected")
