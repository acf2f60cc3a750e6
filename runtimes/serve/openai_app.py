"""`enginekit serve LLM_BUNDLE`: a generation bundle behind an OpenAI-compatible API, on the same
Starlette/uvicorn stack as app.py (socket bound before the model loads, h11 with a header limit,
drained exit 0 on SIGTERM: server.py; body limits and timeout: app.py's _read_body).

    POST /v1/chat/completions   messages → the bundle's chat template (runtimes/chat.py) → generation
    POST /v1/completions        prompt → generation
    GET  /v1/models             the bundle's name as the one model id (GET /v1/models/{id} too)
    GET  /health                200 once loaded and warmed up, else 503 (/v2/health/live, /v2/health/ready too)
    GET  /metrics               Prometheus text format

Both POSTs stream with "stream": true (server-sent events: `data: {chunk}` lines, then `data: [DONE]`;
the chunk shapes are OpenAI's, openai_protocol.py). Requests go to the generator's own `submit` when
it has one (continuous batching), else through llm_batcher.py's LlmBatcher. A request is cancelled,
so the engine stops generating for it, when its client disconnects (streaming: the response is torn
down; otherwise polled every POLL_S), when its text reaches a stop string, and at --request-timeout-s
(300 s): 504, or an error event if its stream had begun. Errors are OpenAI's error JSON with one
paragraph: 400 a body that is not JSON or a field of the wrong type (openai_protocol.py) or a prompt
the engine refuses (too long), 404 a model other than the served one, 408/413 body too slow/large,
503 warming up or shutting down, 504 timeout, 500 only for bugs.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import Future
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from .._deps import require
from ..chat import chat_template_of
from ..decoding import GENERATION_FILE, Generation, SamplingOptions
from ..errors import EnginekitError, UsageError
from ..manifest import Manifest
from .app import ServeConfig, _check, _read_body
from .batching import Overloaded
from .codec import RequestError
from .llm_batcher import LlmBatcher
from .openai_metrics import LlmMetrics
from .openai_protocol import ApiError, ChatRequest, Reply, TextAssembler, error_body, parse_request

log = logging.getLogger("enginekit.serve")
POLL_S = 0.25  # how often a non-streaming request checks that its client is still connected


class _ClientGone(EnginekitError):
    """The client disconnected before its answer was ready (counted as 499; nobody reads it)."""


def generation_bundle(bundles: Sequence[str | os.PathLike[str]]) -> Path | None:
    """The generation bundle among `bundles`, or None when there is none; UsageError when it is not alone."""
    found = [Path(b) for b in bundles if (Path(b) / GENERATION_FILE).is_file()]
    if not found:
        return None
    if len(bundles) > 1:
        raise UsageError(
            f"Expected one generation bundle alone, or only single-engine bundles, per `enginekit serve`, found "
            f"{len(found)} generation bundle(s) ({', '.join(str(b) for b in found)}) among {len(bundles)} bundles. "
            "A generation bundle is served with the OpenAI API (/v1/...), the others with the KServe API "
            "(/v2/...): run one `enginekit serve` per generation bundle and one for the others, on different --port."
        )
    return found[0]


class LlmService:
    """One generation bundle as served: its generator, chat template and submit() (native or LlmBatcher)."""

    def __init__(self, bundle: Path, config: ServeConfig, metrics: LlmMetrics):
        from ..generate import load_generator

        self.generator = load_generator(bundle, device=config.device, threads=config.threads)
        self.vision = getattr(self.generator, "vision", None)  # a VLM bundle: chats may carry images
        self.name = Manifest.read(bundle).name
        self.template = chat_template_of(self.generator)
        self.max_tokens = int(getattr(self.generator, "max_length", 0) or 4096)  # the loop caps it to what fits
        native = getattr(self.generator, "submit", None)
        engine_max = int(getattr(self.generator, "max_batch", 1) or 1)
        if config.max_batch is not None and not 1 <= config.max_batch <= engine_max:
            raise UsageError(f"Expected --max-batch between 1 and {engine_max} for '{self.name}' (its built batch "
                             f"range), found {config.max_batch}. Lower it, or rebuild with --shapes batch=1:1:N.")
        self.batcher = None if callable(native) else LlmBatcher(
            self.generator, max_batch=config.max_batch, max_delay_s=config.max_delay_ms / 1000,
            on_batch=lambda n, secs: metrics.on_batch(self.name, n, secs))
        self.submit: Callable[..., Any] = native if callable(native) else self.batcher.submit  # type: ignore[union-attr]

    def prompt_ids(self, request: ChatRequest) -> list[int]:
        tokenizer = self.generator.tokenizer
        if request.messages is None:
            return list(tokenizer.encode(request.prompt or "", add_special_tokens=True))
        if self.template is None:
            raise ApiError(
                f"Expected a chat template in bundle '{self.name}' for /v1/chat/completions, found none (generation.json "
                "has chat_template null: the model's tokenizer had none). Send the text as a plain prompt to "
                "/v1/completions, or rebuild from a model folder whose tokenizer_config.json has a chat_template.",
                400, param="messages")
        text = self.template.render(request.messages)
        if self.vision is not None:  # each image's placeholder run, as the processor writes it
            from ..vlm import expand_prompt

            try:
                text = expand_prompt(text, len(request.image_urls), self.vision)
            except EnginekitError as exc:
                raise ApiError(f"{exc} (the chat template wrote the image placeholders)", 400, param="messages") from None
        # add_special_tokens=False: the template already wrote the ones the model expects (BOS, turn markers)
        return list(tokenizer.encode(text, add_special_tokens=False))

    def images(self, request: ChatRequest) -> list[Any]:
        """The request's images decoded at the bundle's image size (runtimes/serve/images.py)."""
        if not request.image_urls or self.vision is None:  # a causal LM's messages are text-only (message_text)
            return []
        if len(request.image_urls) > self.vision.max_images:
            raise ApiError(f"Expected at most {self.vision.max_images} images per request (the bundle's images range), "
                           f"found {len(request.image_urls)}. Send fewer, or rebuild with --shapes images=1:1:N.", 400,
                           param="messages")
        from .images import decode_image_url

        return [decode_image_url(u, self.vision.image_size, f"messages (image {k})") for k, u in enumerate(request.image_urls)]

    def decode(self, ids: list[int]) -> str:
        return str(self.generator.tokenizer.decode(ids))

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        self.generator.close()


class _Run:
    """One request in the engine as the event loop sees it: token ids, then the Generation (or the
    engine's error), arrive on a queue fed from the engine's thread through call_soon_threadsafe."""

    def __init__(self, service: LlmService, ids: list[int], options: SamplingOptions, deadline: float,
                 metrics: LlmMetrics, images: list[Any] | None = None):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[int | Future[Generation]] = asyncio.Queue()
        self.deadline, self.metrics, self.model = deadline, metrics, service.name
        self.ended = self.started = False
        self._get: asyncio.Future[Any] | None = None

        def put(item: Any) -> None:
            if not loop.is_closed():  # a token that arrives after shutdown has nobody to go to
                loop.call_soon_threadsafe(self.queue.put_nowait, item)

        self.handle = service.submit(ids, options, put, images=images) if images else service.submit(ids, options, put)
        self.handle.future.add_done_callback(put)

    async def next(self, gone: Callable[[], Awaitable[bool]] | None = None) -> int | Generation:
        """The next token id, or the Generation once it has ended (the engine's error is raised);
        ApiError 504 past the deadline; _ClientGone once gone() says the client left."""
        loop = asyncio.get_running_loop()
        while True:
            left = self.deadline - loop.time()
            if left <= 0:
                raise ApiError("Expected the answer within the server's request timeout, but generation was still "
                               "running; it was cancelled. Ask for fewer max_tokens, or start the server with a "
                               "larger --request-timeout-s.", 504)
            if self._get is None:  # one get() across polls, so that no token is lost to a timeout
                self._get = asyncio.ensure_future(self.queue.get())
            done, _ = await asyncio.wait({self._get}, timeout=min(left, POLL_S) if gone else left)
            if not done:
                if gone is not None and await gone():
                    raise _ClientGone("The client disconnected before its answer was ready.")
                continue
            item, self._get = self._get.result(), None
            if isinstance(item, Future):
                self.ended = True
                self._decoding(False)
                return item.result()
            self._decoding(True)
            return item

    def _decoding(self, on: bool) -> None:
        if on and not self.started:
            self.started = True
            self.metrics.decoding_changed(self.model, +1)
        elif not on and self.started:
            self.started = False
            self.metrics.decoding_changed(self.model, -1)

    def close(self, reason: str) -> None:
        """Cancel the request in the engine unless it has ended (reason: why, for the log and metrics)."""
        if self._get is not None:
            self._get.cancel()
        self._decoding(False)
        if not self.ended:
            self.ended = True
            self.handle.cancel()
            self.metrics.cancelled.labels(self.model, reason).inc()
            if reason != "stop_string":
                log.info("request cancelled (%s): the engine stops generating for it", reason)


def _finish_reason(result: Generation, assembler: TextAssembler) -> str:
    return "stop" if assembler.stopped or result.finish_reason == "stop" else "length"


def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def _reply(data: Any, status: int = 200) -> Any:
    from starlette.responses import Response

    return Response(json.dumps(data, ensure_ascii=False), status, media_type="application/json")


def _status_of(exc: BaseException) -> int:
    from starlette.requests import ClientDisconnect

    if isinstance(exc, ApiError | RequestError):
        return exc.status
    if isinstance(exc, ClientDisconnect | _ClientGone):
        return 499
    if isinstance(exc, Overloaded):
        return 503
    return 400 if isinstance(exc, EnginekitError) else 500


class _Handlers:
    """The routes and lifespan over one LlmService (create_llm_app wires them to Starlette)."""

    def __init__(self, service: LlmService, metrics: LlmMetrics, config: ServeConfig,
                 on_ready: Callable[[], Awaitable[None]] | None, stopping: Callable[[], bool]):
        self.service, self.metrics, self.config, self.on_ready, self.stopping = service, metrics, config, on_ready, stopping
        self.state: dict[str, Any] = {"ready": False, "reason": "warming up"}

    async def warm_up(self) -> None:
        try:
            if self.config.warmup:  # first-run allocations happen here, not in the first request
                ids = self.service.generator.tokenizer.encode("Hello", add_special_tokens=True) or [0]
                handle = self.service.submit(ids, SamplingOptions(max_new_tokens=2), lambda _tok: None)
                await asyncio.wrap_future(handle.future)
            self.state.update(ready=True, reason="")
            log.info("ready: %s", self.service.name)
            if self.on_ready is not None:
                await self.on_ready()
        except Exception as exc:  # stay up, not ready, and say why on /health
            self.state["reason"] = f"warm-up failed: {exc}"
            log.exception("warm-up failed")

    @asynccontextmanager
    async def lifespan(self, _app: Any) -> AsyncIterator[None]:
        warming = asyncio.get_running_loop().create_task(self.warm_up())
        yield
        self.state.update(ready=False, reason="shutting down")  # uvicorn has let the requests in flight finish
        await warming
        await asyncio.get_running_loop().run_in_executor(None, self.service.close)

    async def health(self, _request: Any) -> Any:
        if self.state["ready"]:
            return _reply({"status": "ok", "ready": True, "models": [self.service.name]})
        return _reply({"status": "unavailable", "ready": False, "reason": self.state["reason"]}, 503)

    async def live(self, _request: Any) -> Any:
        return _reply({"live": True})

    def _card(self) -> dict[str, Any]:
        return {"id": self.service.name, "object": "model", "created": 0, "owned_by": "enginekit"}

    async def list_models(self, _request: Any) -> Any:
        return _reply({"object": "list", "data": [self._card()]})

    async def model(self, request: Any) -> Any:
        self._check_model(request.path_params["model"])
        return _reply(self._card())

    async def metrics_endpoint(self, _request: Any) -> Any:
        from starlette.responses import Response

        m = self.metrics
        return Response(m.prom.generate_latest(m.registry), media_type=m.prom.CONTENT_TYPE_LATEST)

    def _check_model(self, model: str) -> None:
        if model != self.service.name:
            raise ApiError(f"Expected the model this server serves, '{self.service.name}', found '{model[:100]}'. "
                           "Send that name as 'model' (GET /v1/models lists it).", 404, param="model",
                           code="model_not_found")

    async def chat_completions(self, request: Any) -> Any:
        return await self._answer(request, chat=True)

    async def completions(self, request: Any) -> Any:
        return await self._answer(request, chat=False)

    async def _answer(self, request: Any, chat: bool) -> Any:
        t0 = time.perf_counter()
        endpoint = "chat" if chat else "completions"
        self.metrics.inflight.labels(self.service.name).inc()
        try:
            response = await self._generate(request, chat, t0)
        except Exception as exc:  # every failure becomes an OpenAI error answer; the process stays up
            response = self.error(exc, endpoint)
        finally:
            self.metrics.inflight.labels(self.service.name).dec()
        self.metrics.requests.labels(self.service.name, endpoint, str(response.status_code)).inc()
        if not getattr(response, "streaming", False):
            self.metrics.latency.labels(self.service.name).observe(time.perf_counter() - t0)
        return response

    def error(self, exc: BaseException, endpoint: str = "other") -> Any:
        status = _status_of(exc)
        if status == 500:
            log.exception("generation failed")
        self.metrics.errors.labels(self.service.name, endpoint, str(status)).inc()
        message = str(exc) if status != 500 else f"Internal error ({type(exc).__name__}); the server log has it."
        return _reply(error_body(message, status, param=getattr(exc, "param", None), code=getattr(exc, "code", None)),
                      status)

    async def _generate(self, request: Any, chat: bool, t0: float) -> Any:
        if not self.state["ready"]:
            raise Overloaded(f"Expected a ready server, but it is {self.state['reason']}. Poll GET /health.")
        deadline = asyncio.get_running_loop().time() + self.config.request_timeout_s
        body = await _read_body(request, self.config, self.stopping)
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise ApiError(f"Expected a JSON request body, found one that does not parse ({str(exc)[:120]}). Send "
                           "the request as JSON with Content-Type: application/json.", 400) from None
        parsed = parse_request(data, chat, vision=self.service.vision is not None)
        self._check_model(parsed.model)
        images = self.service.images(parsed)
        ids = self.service.prompt_ids(parsed)
        options = parsed.options(self.service.max_tokens, add_special_tokens=not chat)
        options.validate()
        reply = Reply(self.service.name, chat, len(ids))
        run = _Run(self.service, ids, options, deadline, self.metrics, images)
        try:  # the first token (or the engine's refusal, say a prompt too long) before any answer is sent
            first = await run.next(request.is_disconnected)
        except BaseException as exc:
            run.close("client_disconnect" if isinstance(exc, _ClientGone | asyncio.CancelledError) else "timeout")
            raise
        self.metrics.first_token(self.service.name, time.perf_counter() - t0)
        if parsed.stream:
            return self._stream(run, first, parsed, reply, t0)
        return await self._collect(run, first, parsed, reply, request.is_disconnected)

    async def _collect(self, run: _Run, item: int | Generation, parsed: ChatRequest, reply: Reply,
                       gone: Callable[[], Awaitable[bool]]) -> Any:
        assembler = TextAssembler(self.service.decode, parsed.stop)
        reason = "timeout"
        try:
            while not isinstance(item, Generation):
                assembler.push(item)
                if assembler.stopped:
                    reason = "stop_string"
                    break
                item = await run.next(gone)
        except _ClientGone:
            reason = "client_disconnect"
            raise
        finally:
            run.close(reason)
        finish = "stop" if assembler.stopped else _finish_reason(item, assembler)  # type: ignore[arg-type]
        assembler.finish()
        self.metrics.tokens.labels(self.service.name).inc(len(assembler.ids))
        return _reply(reply.full(assembler.text, finish, len(assembler.ids)))

    def _stream(self, run: _Run, first: int | Generation, parsed: ChatRequest, reply: Reply, t0: float) -> Any:
        assembler = TextAssembler(self.service.decode, parsed.stop)
        usage = parsed.include_usage
        state = {"reason": "client_disconnect"}  # what tore the stream down, unless it ends normally

        async def events() -> AsyncIterator[bytes]:
            if reply.chat:
                yield _sse(reply.chunk("", role=True, include_usage=usage))
            item = first
            try:
                while not isinstance(item, Generation):
                    piece = assembler.push(item)
                    if piece:
                        yield _sse(reply.chunk(piece, include_usage=usage))
                    if assembler.stopped:
                        state["reason"] = "stop_string"
                        break
                    item = await run.next()
            except EnginekitError as exc:  # the timeout, or the engine failed mid-stream: say so in the stream
                state["reason"] = "timeout"
                status = _status_of(exc)
                self.metrics.errors.labels(self.service.name, "stream", str(status)).inc()
                yield _sse(error_body(str(exc), status))
                yield b"data: [DONE]\n\n"
                return
            tail = assembler.finish()
            if tail:
                yield _sse(reply.chunk(tail, include_usage=usage))
            finish = "stop" if assembler.stopped else _finish_reason(item, assembler)  # type: ignore[arg-type]
            yield _sse(reply.chunk(None if reply.chat else "", finish, include_usage=usage))
            if usage:
                yield _sse(reply.chunk(None, usage=reply.usage(len(assembler.ids))))
            yield b"data: [DONE]\n\n"
            if state["reason"] == "client_disconnect":
                state["reason"] = "done"

        def closed() -> None:  # runs however the response ends: finished, client gone, server stopping
            run.close(state["reason"])
            self.metrics.tokens.labels(self.service.name).inc(len(assembler.ids))
            self.metrics.latency.labels(self.service.name).observe(time.perf_counter() - t0)

        return _closing_stream_class()(events(), closed, media_type="text/event-stream",
                                       headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@functools.cache
def _closing_stream_class() -> type:
    from starlette.responses import StreamingResponse

    class ClosingStream(StreamingResponse):
        """A StreamingResponse that calls `on_close` when it ends, however it ends: Starlette cancels the
        body iterator when the client disconnects, and a suspended async generator's `finally` would
        run only when it is garbage-collected."""

        streaming = True

        def __init__(self, content: Any, on_close: Callable[[], None], **kwargs: Any):
            super().__init__(content, **kwargs)
            self.on_close = on_close

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.on_close()

    return ClosingStream


def create_llm_app(service: LlmService, metrics: LlmMetrics, config: ServeConfig,
                   on_ready: Callable[[], Awaitable[None]] | None = None,
                   stopping: Callable[[], bool] | None = None) -> Any:
    """The Starlette app serving `service` (warm-up runs in the background and flips /health)."""
    require("starlette", extra="serve", purpose="enginekit serve")
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    h = _Handlers(service, metrics, config, on_ready, stopping or (lambda: False))

    async def http_error(_request: Any, exc: Any) -> Any:
        return _reply(error_body(str(exc.detail), exc.status_code), exc.status_code)

    async def user_error(_request: Any, exc: Exception) -> Any:
        return h.error(exc)

    return Starlette(
        routes=[
            Route("/v1/chat/completions", h.chat_completions, methods=["POST"]),
            Route("/v1/completions", h.completions, methods=["POST"]),
            Route("/v1/models", h.list_models), Route("/v1/models/{model:path}", h.model),
            Route("/health", h.health), Route("/v2/health/ready", h.health), Route("/v2/health/live", h.live),
            Route("/metrics", h.metrics_endpoint),
        ],
        lifespan=h.lifespan,
        exception_handlers={HTTPException: http_error, EnginekitError: user_error},
    )


def run_llm_server(bundle: str | os.PathLike[str], *, host: str = "127.0.0.1", port: int = 8000,
                   config: ServeConfig | None = None, log_level: str = "info") -> None:
    """Bind host:port, load the generation bundle, then serve until SIGTERM/SIGINT, drain, and return.
    Prints `enginekit serve: ready on http://HOST:PORT (name)` once warmed up, as run_server does."""
    require("uvicorn", extra="serve", purpose="enginekit serve")
    from .server import bind_socket, serve_on

    config = config or ServeConfig()
    _check(config)
    if not log.handlers:  # uvicorn configures its own loggers only; this one says which requests were cancelled
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    if not config.request_timeout_s > 0:
        raise UsageError(f"Expected --request-timeout-s > 0, found {config.request_timeout_s}. Leave it out for 300 s.")
    sock = bind_socket(host, port)
    try:
        metrics = LlmMetrics()
        service = LlmService(Path(bundle), config, metrics)
        serve_on(sock, config, log_level, service.name,
                 lambda on_ready, stopping: create_llm_app(service, metrics, config, on_ready=on_ready, stopping=stopping))
    finally:
        sock.close()


__all__ = ["LlmService", "create_llm_app", "generation_bundle", "run_llm_server"]
