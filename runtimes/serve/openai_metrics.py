"""Prometheus metrics of the OpenAI-compatible server (openai_app.py), in a registry of their own.

Batching shows in two of them: `enginekit_batch_size` (requests per generate_ids call, when the
server batches through llm_batcher.py) and `enginekit_llm_decoding_requests_peak` (the most requests
that were producing tokens at the same moment, whatever engine batches them: a generator that ran
one request at a time would never exceed 1).
"""

from __future__ import annotations

from .._deps import require

SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class LlmMetrics:
    """Counters, histograms and gauges labelled by model (and endpoint, status, reason)."""

    def __init__(self) -> None:
        prom = require("prometheus_client", extra="serve", purpose="The service's /metrics endpoint")
        self.prom = prom
        self.registry = r = prom.CollectorRegistry()
        self.requests = prom.Counter("enginekit_requests", "Generation requests by model, endpoint and HTTP status.",
                                     ["model", "endpoint", "code"], registry=r)
        self.errors = prom.Counter("enginekit_errors", "Failed generation requests by model, endpoint and status.",
                                   ["model", "endpoint", "code"], registry=r)
        self.latency = prom.Histogram("enginekit_request_latency_seconds", "Request latency, arrival to the last "
                                      "byte of the answer.", ["model"], registry=r,
                                      buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300))
        self.ttft = prom.Histogram("enginekit_llm_time_to_first_token_seconds", "Arrival to the first generated "
                                   "token.", ["model"], registry=r,
                                   buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.tokens = prom.Counter("enginekit_llm_generated_tokens", "Tokens generated for answers.", ["model"],
                                   registry=r)
        self.cancelled = prom.Counter("enginekit_llm_cancelled_requests", "Requests cancelled in the engine, by "
                                      "reason: client_disconnect, timeout, stop_string.", ["model", "reason"],
                                      registry=r)
        self.batch_size = prom.Histogram("enginekit_batch_size", "Requests per generate_ids call (llm_batcher).",
                                         ["model"], registry=r, buckets=SIZES)
        self.engine_seconds = prom.Histogram("enginekit_engine_seconds", "Time of one generate_ids call.", ["model"],
                                             registry=r, buckets=(.01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300))
        self.inflight = prom.Gauge("enginekit_inflight_requests", "Generation requests being handled.", ["model"],
                                   registry=r)
        self.decoding = prom.Gauge("enginekit_llm_decoding_requests", "Requests between their first token and "
                                   "their end.", ["model"], registry=r)
        self.decoding_peak = prom.Gauge("enginekit_llm_decoding_requests_peak", "The most requests decoding at the "
                                        "same moment since the start.", ["model"], registry=r)
        self._decoding: dict[str, int] = {}
        self._peak: dict[str, int] = {}

    def on_batch(self, model: str, requests: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(requests)
        self.engine_seconds.labels(model).observe(seconds)

    def first_token(self, model: str, seconds: float) -> None:
        self.ttft.labels(model).observe(seconds)

    def decoding_changed(self, model: str, delta: int) -> None:
        """Called on the event loop only, so the count needs no lock."""
        now = self._decoding[model] = self._decoding.get(model, 0) + delta
        self.decoding.labels(model).set(now)
        if now > self._peak.get(model, 0):
            self._peak[model] = now
            self.decoding_peak.labels(model).set(now)
