"""The HTTP service: Starlette routes over one DynamicBatcher per loaded bundle, served by uvicorn.

Why Starlette on uvicorn: Starlette is the small ASGI toolkit that FastAPI itself is built on, and
this service needs none of FastAPI's pydantic models (inputs are checked against the manifest by
Runner.validate, the one source of truth, and .npz bodies are not JSON schemas anyway). uvicorn is
the reference ASGI server: on SIGTERM/SIGINT it stops accepting connections, lets requests in flight
finish (up to `graceful_timeout_s`), then runs the app's shutdown, which drains the batchers; the
process then exits 0. How run_server sets uvicorn up (h11 with a header limit, the socket bound before
the models load, the exit code) is in server.py; where bodies are decoded, off the loop, in offload.py.

Endpoints (the paths follow the KServe v2 / Triton HTTP layout, so moving to Triton keeps the URLs):

    GET  /v2                        server metadata: name, version, extensions (binary_tensor_data)
    GET  /v2/health/live            200 while the process runs
    GET  /v2/health/ready           200 once every model is loaded and warmed up, else 503
    GET  /v2/models                 metadata of every model
    GET  /v2/models/{name}          one model: KServe's name, versions, platform, inputs/outputs
                                    ({name, datatype, shape with -1 for dynamic dims, named_shape}),
                                    and dims, batching, precision, parity
    GET  /v2/models/{name}/ready    200 once warmed up, else 503 (tritonclient's is_model_ready)
    POST /v2/models/{name}/infer    JSON short form or .npz (codec.py), or KServe v2 JSON or binary
                                    (kserve.py, what tritonclient.http sends); ?outputs=a,b selects
                                    outputs (a KServe body's own 'outputs' list takes precedence)
    GET  /metrics                   Prometheus text format

Status codes: 400 unreadable body (KServe: shape and data disagree, truncated binary data, a bad
Inference-Header-Content-Length), 404 unknown model, 408 body not received within --body-timeout-s
(10 s; the connection is closed), 413 body too large, 415 a Content-Type other than application/json
or application/x-npz (application/octet-stream reads as .npz), or none, except with an
Inference-Header-Content-Length or a KServe JSON body, 422 inputs that do not fit the engine
(Runner.validate's message, a KServe datatype other than the input's) or an ?outputs= that names none or
unknown ones, 503 warming up / queue full / shutting down (a request
still sending its body when SIGTERM arrives gets it at once, with the connection closed), 500 only
for bugs. Every such error body is {"error": "<one paragraph>"}. 499 is never sent: it is how the
metrics count a client that disconnected before its body was complete (nginx's convention). uvicorn
itself answers, in plain text and closing the connection, 400 to a request head (request line +
headers) still incomplete after 64 KiB (server.py says why a head that arrives in one read may be
larger), and 503 to requests beyond --limit-concurrency (1,024 connections or requests at once).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._deps import require
from .._version import __version__
from ..base import Runner
from ..errors import EnginekitError, InvalidInput, UsageError
from ..manifest import IOSpec
from ..samples import SHAPE_POINTS, generate_feeds
from .batching import DynamicBatcher, Overloaded
from .codec import RequestError, response_kind
from .kserve import HEADER, selected, tensor_metadata
from .offload import Codec

log = logging.getLogger("enginekit.serve")
STATUS_KIND = {400: "bad_request", 404: "unknown_model", 408: "body_timeout", 413: "too_large",
               415: "unsupported_media_type", 422: "invalid_input", 499: "client_disconnect", 503: "unavailable",
               500: "internal"}
STOP_POLL_S = 0.1  # how often a request waiting for its body checks for shutdown (uvicorn's own tick)


@dataclass
class ServeConfig:
    """Defaults: batches up to the engine's max batch, 2 ms delay budget, 1,024 queued requests per
    model, 64 MiB bodies that must arrive within 10 s, 30 s for in-flight requests at shutdown, the
    bundle's own device. run_server also applies the HTTP limits: idle keep-alive connections close
    after 5 s, 1,024 connections or requests at once, request heads of 64 KiB (server.py).
    codec_threads / codec_processes: where bodies are decoded and answers encoded (offload.py)."""

    max_batch: int | None = None
    max_delay_ms: float = 2.0
    max_queue: int = 1024
    max_body_bytes: int = 64 << 20
    body_timeout_s: float = 10.0
    graceful_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    limit_concurrency: int | None = 1024
    max_header_bytes: int = 64 << 10
    device: str | None = None
    threads: int | None = None
    warmup: bool = True
    codec_threads: int = 2
    codec_processes: int = 1
    request_timeout_s: float = 300.0  # generation bundles (openai_app.py): a request's whole answer


def batch_dim(io: IOSpec) -> str | None:
    """The named dim at axis 0 of every input and output: the axis requests can be stacked along."""
    firsts = {s.shape[0] if s.shape else None for s in io.inputs + io.outputs}
    name = firsts.pop() if len(firsts) == 1 else None
    return name if isinstance(name, str) and name in io.dims else None


def public_source(source: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's source as clients may see it: its kind, the last component of its location and
    the task. The spec itself is where the model was on the build machine (hf:/home/u/models/x,
    py:/srv/app/models.py:make), which is none of a client's business and helps an attacker."""
    kind, _, location = str(source.get("spec") or "").partition(":")
    if kind in ("hf", "timm"):  # hf:<dir or hub id>#task, timm:<name>#pretrained
        location = location.partition("#")[0]
    name = re.split(r"[\\/]", location.rstrip("\\/"))[-1]
    return {"kind": source.get("kind") or kind or None, "name": name or None, "task": source.get("task")}


class ModelService:
    """One bundle as served: its runner, a one-thread executor (engine runs never overlap) and its batcher."""

    def __init__(self, runner: Runner, config: ServeConfig, on_batch: Callable[[str, int, int, float], None]):
        self.runner = runner
        self.name = runner.manifest.name
        io = runner.manifest.io
        self.batch_dim = batch_dim(io)
        engine_max = io.dims[self.batch_dim].max if self.batch_dim else 1
        if config.max_batch is not None and not 1 <= config.max_batch <= engine_max:
            raise UsageError(
                f"Expected --max-batch between 1 and {engine_max} for '{self.name}' (its built "
                f"{'range of ' + repr(self.batch_dim) if self.batch_dim else 'static batch'}), found "
                f"{config.max_batch}. Lower it, or rebuild with a wider range (--shapes batch=MIN:OPT:MAX)."
            )
        if config.max_delay_ms < 0:
            raise UsageError(f"Expected --max-delay-ms >= 0, found {config.max_delay_ms}.")
        self.max_batch = config.max_batch or engine_max
        self.max_delay_ms = config.max_delay_ms
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{self.name}")
        self.batcher = DynamicBatcher(
            runner.infer, max_batch=self.max_batch, max_delay_s=config.max_delay_ms / 1000,
            batched=self.batch_dim is not None, max_queue=config.max_queue, executor=self.executor,
            on_batch=lambda rows, reqs, secs: on_batch(self.name, rows, reqs, secs),
        )

    def warm_up(self) -> None:
        """One run at the min, opt and max shapes: first-run allocations happen here, not in a request."""
        for point in SHAPE_POINTS:
            self.runner.infer(generate_feeds(self.runner.manifest.io, point, seed=0))

    def metadata(self) -> dict[str, Any]:
        m = self.runner.manifest
        return {
            "name": self.name,
            "platform": f"enginekit-{m.target.backend}-{m.target.device}",
            "versions": ["1"],
            "inputs": [tensor_metadata(s) for s in m.io.inputs], "outputs": [tensor_metadata(s) for s in m.io.outputs],
            "dims": {k: {"min": v.min, "opt": v.opt, "max": v.max} for k, v in m.io.dims.items()},
            "batching": {"dim": self.batch_dim, "max_batch": self.batcher.max_batch, "max_delay_ms": self.max_delay_ms,
                         "policy": "requests with equal non-batch shapes share an engine run"},
            "precision": m.precision, "source": public_source(m.source),
            "parity": (m.parity or {}).get("status"), "enginekit_version": m.enginekit_version,
            "created_at": m.created_at,
        }

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.runner.close()


class Metrics:
    """Prometheus metrics in a registry of their own, so several apps can live in one process."""

    def __init__(self) -> None:
        prom = require("prometheus_client", extra="serve", purpose="The service's /metrics endpoint")
        self.prom = prom
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter("enginekit_requests", "Inference requests by model and HTTP status.",
                                     ["model", "code"], registry=r)
        self.errors = prom.Counter("enginekit_errors", "Failed inference requests by model and kind.",
                                   ["model", "kind"], registry=r)
        self.latency = prom.Histogram("enginekit_request_latency_seconds", "Inference request latency, body read "
                                      "to response.", ["model"], registry=r,
                                      buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch_size = prom.Histogram("enginekit_batch_size", "Rows per engine run.", ["model"], registry=r,
                                         buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batch_requests = prom.Histogram("enginekit_batch_requests", "Requests per engine run.", ["model"],
                                             registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.engine_seconds = prom.Histogram("enginekit_engine_seconds", "Engine run time per batch.", ["model"],
                                             registry=r, buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1))
        self.inflight = prom.Gauge("enginekit_inflight_requests", "Inference requests being handled.", ["model"],
                                   registry=r)

    def on_batch(self, model: str, rows: int, requests: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(rows)
        self.batch_requests.labels(model).observe(requests)
        self.engine_seconds.labels(model).observe(seconds)


def load_models(bundles: Sequence[str | os.PathLike[str]], config: ServeConfig, metrics: Metrics) -> list[ModelService]:
    """Load every bundle with the thin runtime (sha256 and version checks included); names must be unique."""
    from .. import load

    services: list[ModelService] = []
    for bundle in bundles:
        service = ModelService(load(bundle, device=config.device, threads=config.threads), config, metrics.on_batch)
        if any(s.name == service.name for s in services):
            raise UsageError(
                f"Expected distinct model names, but two bundles are named '{service.name}' ({bundle} and an "
                "earlier one). Serve them from separate processes, or rebuild one with another -o name."
            )
        services.append(service)
    return services


def create_app(models: Sequence[ModelService], metrics: Metrics, config: ServeConfig,
               on_ready: Callable[[], Awaitable[None]] | None = None,
               stopping: Callable[[], bool] | None = None) -> Any:
    """The Starlette app serving `models`; warm-up runs in the background and flips readiness.
    stopping: True once the server shuts down (run_server passes uvicorn's should_exit); requests
    still waiting for their body then get 503 at once instead of holding the shutdown up."""
    require("starlette", extra="serve", purpose="enginekit serve")
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    h = _Handlers(models, metrics, config, on_ready, stopping or (lambda: False))
    return Starlette(
        routes=[
            Route("/v2", h.server_metadata), Route("/v2/health/live", h.live), Route("/v2/health/ready", h.ready),
            Route("/v2/models", h.list_models), Route("/v2/models/{name}", h.model_metadata),
            Route("/v2/models/{name}/ready", h.model_ready),
            Route("/v2/models/{name}/infer", h.infer, methods=["POST"]), Route("/metrics", h.metrics_endpoint),
        ],
        lifespan=h.lifespan,
        exception_handlers={HTTPException: h.http_error, EnginekitError: h.user_error},
    )


def _reply(data: Any, status: int = 200, **headers: str) -> Any:
    from starlette.responses import Response

    return Response(json.dumps(data), status, media_type="application/json", headers=headers or None)


class _Handlers:
    """The service's routes and lifespan over one set of models (create_app wires them to Starlette)."""

    def __init__(self, models: Sequence[ModelService], metrics: Metrics, config: ServeConfig,
                 on_ready: Callable[[], Awaitable[None]] | None, stopping: Callable[[], bool]):
        self.models, self.metrics, self.config, self.on_ready = models, metrics, config, on_ready
        self.stopping = stopping
        self.by_name = {m.name: m for m in models}
        self.state: dict[str, Any] = {"ready": False, "reason": "warming up"}
        # not the engine's one-thread executor: decoding a request must not wait for engine runs
        self.codec = Codec(config.codec_threads, config.codec_processes)

    async def warm_up(self) -> None:
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self.codec.threads, self.codec.start)
            if self.config.warmup:
                for m in self.models:
                    await loop.run_in_executor(m.executor, m.warm_up)
            self.state.update(ready=True, reason="")
            log.info("ready: %s", ", ".join(self.by_name))
            if self.on_ready is not None:
                await self.on_ready()
        except Exception as exc:  # stay up, not ready, and say why on /v2/health/ready
            self.state["reason"] = f"warm-up failed: {exc}"
            log.exception("warm-up failed")

    @asynccontextmanager
    async def lifespan(self, _app: Any) -> AsyncIterator[None]:
        for m in self.models:
            m.batcher.start()
        warming = asyncio.get_running_loop().create_task(self.warm_up())
        yield
        # uvicorn calls this after the requests in flight have finished; drain whatever is queued.
        self.state.update(ready=False, reason="shutting down")
        await warming
        for m in self.models:
            await m.batcher.close()
            m.close()
        self.codec.close()

    async def live(self, _request: Any) -> Any:
        return _reply({"live": True})

    async def ready(self, _request: Any) -> Any:
        if self.state["ready"]:
            return _reply({"ready": True, "models": list(self.by_name)})
        return _reply({"ready": False, "reason": self.state["reason"]}, 503)

    async def server_metadata(self, _request: Any) -> Any:
        return _reply({"name": "enginekit", "version": __version__, "extensions": ["binary_tensor_data"]})

    async def model_ready(self, request: Any) -> Any:  # tritonclient's is_model_ready: True on 200
        name = _find(self.by_name, request.path_params["name"]).name
        if self.state["ready"]:
            return _reply({"name": name, "ready": True})
        return _reply({"name": name, "ready": False, "reason": self.state["reason"]}, 503)

    async def list_models(self, _request: Any) -> Any:
        return _reply({"models": [m.metadata() for m in self.models]})

    async def model_metadata(self, request: Any) -> Any:
        return _reply(_find(self.by_name, request.path_params["name"]).metadata())

    async def metrics_endpoint(self, _request: Any) -> Any:
        from starlette.responses import Response

        m = self.metrics
        return Response(m.prom.generate_latest(m.registry), media_type=m.prom.CONTENT_TYPE_LATEST)

    async def infer(self, request: Any) -> Any:
        t0 = time.perf_counter()
        name = request.path_params["name"]
        label = name if name in self.by_name else "unknown"  # no label per arbitrary URL: bounded cardinality
        metrics = self.metrics
        metrics.inflight.labels(label).inc()
        try:
            response = await self._infer(request, name)
        except Exception as exc:  # every failure becomes an HTTP answer; the process stays up
            status = _status_of(exc)
            if status == 500:
                log.exception("inference on '%s' failed", name)
            elif status == 499:  # the client's doing, and nobody is left to read an answer
                log.debug("client left before sending the whole body of a request to '%s'", name)
            metrics.errors.labels(label, STATUS_KIND.get(status, str(status))).inc()
            # 408 and 413 leave a body unread, and while shutting down no connection is kept
            close = status in (408, 413) or self.stopping()
            response = _reply({"error": str(exc)}, status, **({"Connection": "close"} if close else {}))
        finally:
            metrics.inflight.labels(label).dec()
        metrics.requests.labels(label, str(response.status_code)).inc()
        metrics.latency.labels(label).observe(time.perf_counter() - t0)
        return response

    async def _infer(self, request: Any, name: str) -> Any:
        from starlette.responses import Response

        model = _find(self.by_name, name)
        if not self.state["ready"]:
            raise Overloaded(f"Expected a ready service, but it is {self.state['reason']}. Poll /v2/health/ready.")
        body = await _read_body(request, self.config, self.stopping)
        content_type = request.headers.get("content-type")
        decoded = await self.codec.decode(body, content_type, model.runner.input_specs(), limit=self.config.max_body_bytes,
                                          validate=model.runner.validate, header_length=request.headers.get(HEADER))
        del body  # a large body need not stay alive while the request waits for its batch
        kserve = decoded.kserve
        names = [s.name for s in model.runner.output_specs()]
        wanted = (kserve and selected(kserve, names, name)) or _wanted_outputs(model, request.query_params.get("outputs"))
        outputs = await model.batcher.submit(decoded.feeds)
        if kserve is not None:
            answer, head = await self.codec.encode_kserve(name, {k: outputs[k] for k in wanted}, kserve)
            if head is None:
                return Response(answer, media_type="application/json")
            return Response(answer, media_type="application/octet-stream", headers={HEADER: str(head)})
        kind = response_kind(request.headers.get("accept"), content_type)
        return Response(await self.codec.encode(name, {k: outputs[k] for k in wanted}, kind), media_type=kind)

    async def http_error(self, _request: Any, exc: Exception) -> Any:
        return _reply({"error": getattr(exc, "detail", str(exc))}, getattr(exc, "status_code", 500))

    async def user_error(self, _request: Any, exc: Exception) -> Any:  # outside /infer, e.g. unknown model
        return _reply({"error": str(exc)}, _status_of(exc))


def _find(by_name: dict[str, ModelService], name: str) -> ModelService:
    if name not in by_name:
        raise RequestError(f"Expected one of the served models {sorted(by_name)}, found '{name[:100]}'. "
                           "GET /v2/models lists them.", status=404)
    return by_name[name]


def _wanted_outputs(model: ModelService, param: str | None) -> list[str]:
    """Every output without ?outputs=; with it, the ones it names (at least one, all known)."""
    names = [s.name for s in model.runner.output_specs()]
    if param is None:
        return names
    wanted = [w.strip() for w in param.split(",") if w.strip()]
    unknown = [w[:100] for w in wanted if w not in names][:10]
    if unknown or not wanted:
        found = f"unknown ones {unknown}" if unknown else f"no output name ('{param[:100]}')"
        raise InvalidInput(f"Expected ?outputs= to name outputs of '{model.name}' ({', '.join(names)}), comma-"
                           f"separated, found {found}. Name at least one of them, or leave ?outputs= out for all.")
    return list(dict.fromkeys(wanted))


async def _read_body(request: Any, config: ServeConfig, stopping: Callable[[], bool]) -> bytes:
    """The body, read within config.body_timeout_s (else 408); 413 when it exceeds the limit.

    An oversized body is still read (and dropped) up to 8x the limit, because closing a socket with
    unread data makes the kernel reset the connection, and the client would see a broken connection
    instead of the 413; beyond that it is cut off. The ASGI messages are read here rather than with
    Starlette's request.stream(), so that waiting for them can stop at the deadline or at shutdown."""
    from starlette.requests import ClientDisconnect

    limit = config.max_body_bytes
    too_large = RequestError(f"Expected a request body of at most {limit} bytes, but it is larger. Split the "
                             "batch into smaller requests, or start the service with a larger --max-body-mb.",
                             status=413)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > 8 * limit:
        raise too_large
    deadline = asyncio.get_running_loop().time() + config.body_timeout_s
    body = bytearray()
    seen = 0
    while True:
        message = await _receive(request.receive, deadline, stopping)
        if message is None:
            raise RequestError(
                f"Expected the request body ({declared or 'unknown length'} bytes declared) within "
                f"{config.body_timeout_s:g} s, but only {seen} bytes arrived. Send the body without stalling, or "
                "start the service with a larger --body-timeout-s.", status=408)
        if message["type"] == "http.disconnect":
            raise ClientDisconnect(f"The client disconnected after {seen} bytes of its request body.")
        chunk = message.get("body", b"")
        seen += len(chunk)
        if seen <= limit:
            body += chunk
        if seen > 8 * limit or not message.get("more_body", False):
            break
    if seen > limit:
        raise too_large
    return bytes(body)


async def _receive(receive: Callable[[], Awaitable[dict[str, Any]]], deadline: float,
                   stopping: Callable[[], bool]) -> dict[str, Any] | None:
    """The next ASGI message; None once `deadline` passes; Overloaded (503) once shutdown begins."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(receive())
    try:
        while True:
            left = deadline - loop.time()
            if left <= 0:
                return None
            done, _ = await asyncio.wait({task}, timeout=min(left, STOP_POLL_S))
            if done:
                return task.result()
            if stopping():  # uvicorn would otherwise wait up to graceful_timeout_s for this body
                raise Overloaded("Expected the rest of the request body, but the service is shutting down and "
                                 "stopped waiting for it. Retry against another instance, or after the restart.")
    finally:
        task.cancel()  # a no-op once it is done


def _status_of(exc: Exception) -> int:
    from starlette.requests import ClientDisconnect

    if isinstance(exc, ClientDisconnect):
        return 499
    if isinstance(exc, RequestError):
        return exc.status
    if isinstance(exc, InvalidInput):
        return 422
    if isinstance(exc, Overloaded):
        return 503
    if isinstance(exc, EnginekitError):
        return 400
    return 500


def run_server(bundles: Sequence[str | os.PathLike[str]], *, host: str = "127.0.0.1", port: int = 8000,
               config: ServeConfig | None = None, log_level: str = "info") -> None:
    """Bind host:port, load the bundles (a taken port or a bad bundle is reported here, in a second or
    two, before any model is warmed up), then serve until SIGTERM/SIGINT, drain, and return.

    Prints one line `enginekit serve: ready on http://HOST:PORT (models)` once warmed up; with
    port 0 the system picks a free port and the line says which.
    """
    require("uvicorn", extra="serve", purpose="enginekit serve")
    from .server import bind_socket, serve_on

    config = config or ServeConfig()
    _check(config)
    sock = bind_socket(host, port)
    try:
        metrics = Metrics()
        models = load_models([Path(b) for b in bundles], config, metrics)
        serve_on(sock, config, log_level, ", ".join(m.name for m in models),
                 lambda on_ready, stopping: create_app(models, metrics, config, on_ready=on_ready, stopping=stopping))
    finally:
        sock.close()


def _check(config: ServeConfig) -> None:
    for flag, value in (("--body-timeout-s", config.body_timeout_s), ("--limit-concurrency", config.limit_concurrency)):
        if value is not None and not value > 0:
            raise UsageError(f"Expected {flag} > 0, found {value}. Leave it out for the default.")


__all__ = ["Metrics", "ModelService", "ServeConfig", "batch_dim", "create_app", "load_models", "run_server"]
