"""Generation bundles that ONNX Runtime GenAI runs (`onnxruntime-genai`, its model builder wrote the decoder
at build time: one graph with shared-buffer GroupQueryAttention, and genai_config.json), behind the same
torch-free API as enginekit's own loop (runtimes/decoding.py):

    from runtimes.generate import load_generator
    with load_generator("engines/smollm2-ort-fp32") as g:      # a GenaiGenerator for such a bundle
        print(g.generate("The capital of France is").text)

- generate_ids (the token gate, `enginekit generate`, bench): og.Generator, one batch, right-padded rows (GenAI
  derives the attention mask from the pad id; left padding gives wrong tokens, measured on a tiny Qwen2).
- submit (the OpenAI server): og.Engine, GenAI's continuous batching: requests join and leave the running batch
  at every step; one thread owns the engine.
Stopping is this module's, not GenAI's: GenAI stops a row at its eos, and the gate needs exactly N steps, so the
model is opened with the vocabulary's last id as its eos and pad (an empty eos list is ignored by GenAI 0.18, and
a list merges with the config's: measured); rows stop at SamplingOptions.stop_token_ids or the bundle's eos. The
one thing lost: a model that emits its last vocabulary id (a padding row in most vocabularies) ends that row
there. The pad id must not occur in the prompts of one batch (rows run one by one when it does): many models pad
with their eos, and a chat prompt holds it (<|im_end|>).
On CUDA the provider is GenAI's CUDA EP; `cuda_graph=True` captures the decode step of batch-1 runs (GenAI 0.18
refuses larger batches with a graph; they and the Engine run on a second model opened without one).
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from ._deps import require
from .decoding import (
    Generation,
    Generator,
    SamplingOptions,
    Tokenizer,
    _read_spec,
    take_step,
)
from .errors import EngineRefused, IncompatibleEngine, InvalidInput, UsageError
from .manifest import IOSpec, Manifest, confined_path, verify_files

RUNTIME = "onnxruntime-genai"  # generation.json "runtime" and the manifest's target.options.generator
CONFIG_FILE = "genai_config.json"


class GenaiGenerator(Generator):
    """Runs a GenAI generation bundle. device: None (the bundle's), 'cpu' or 'cuda'; threads: CPU intra-op
    threads; cuda_graph: capture the decode step in a CUDA graph (default: on for CUDA; batch 1 only)."""

    def __init__(self, bundle: str | Path, *, device: str | None = None, threads: int | None = None,
                 verify: bool = True, cuda_graph: bool | None = None, folder: Path | None = None):
        """folder: run this GenAI model folder instead of the bundle's (the build's gate only: the GroupQueryAttention
        twin of a PagedAttention decoder, which gives the teacher-forced logits the Engine does not)."""
        self.og = require("onnxruntime_genai", extra="genai", purpose="Running an ONNX Runtime GenAI bundle")
        self.bundle = Path(bundle)
        self.manifest = Manifest.read(self.bundle)
        if verify:
            verify_files(self.bundle, self.manifest)
        self.spec = _read_spec(self.bundle, self.manifest)
        self._tokenizer = Tokenizer(self.manifest.file(self.bundle, self.spec["tokenizer"], "tokenizer")) \
            if self.spec.get("tokenizer") else None
        self.device = device or self.manifest.target.device
        self.io = {name: IOSpec.from_dict(c["io"]) for name, c in self.spec["components"].items()}
        dims = self.io["decoder"].dims
        self.max_length, self.max_batch = dims["total_sequence"].max, dims["batch"].max
        self.eos = [int(t) for t in self.spec.get("eos_token_ids", [])]
        self.vocab = int(self.spec["genai"]["vocab_size"])
        self.pad = self.vocab - 1
        self.cuda_graph = bool(self.device == "cuda" if cuda_graph is None else cuda_graph)
        self._folder = folder
        # PagedAttention decoders run on GenAI's Engine only (og.Generator refuses their packed inputs: "Invalid
        # rank for input: input_ids", measured on the H200); generate_ids then submits each row to the Engine.
        self.paged = folder is None and self.spec["genai"].get("attention") == "paged"
        self._threads = threads
        self.model = self._open(threads, self.cuda_graph and self.device == "cuda")
        self._batch_model: Any = None  # CUDA graphs on: batches run on a second model without one (opened once)
        self._open_lock = threading.Lock()
        self._engine: _EngineThread | None = None

    def _open(self, threads: int | None, cuda_graph: bool) -> Any:
        og = self.og
        folder = self._folder or confined_path(self.bundle, self.spec["genai"]["folder"], "GenAI model folder")
        config_path = folder / CONFIG_FILE if self._folder else \
            self.manifest.file(self.bundle, f"{self.spec['genai']['folder']}/{CONFIG_FILE}", "GenAI config")
        try:
            decoder = json.loads(config_path.read_text(encoding="utf-8"))["model"]["decoder"]["filename"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IncompatibleEngine(f"Expected {config_path} to be the GenAI config the build wrote, but it cannot be "
                                     f"read ({type(exc).__name__}). Rebuild with: {self.manifest.rebuild_command}") from None
        if self._folder is None and f"{self.spec['genai']['folder']}/{decoder}" not in self.manifest.target.engine_files:
            raise IncompatibleEngine(f"Expected {config_path} to name the bundle's decoder, found '{str(decoder)[:200]}'. "
                                     f"An unlisted graph is never run. Rebuild with: {self.manifest.rebuild_command}")
        if self.device == "cuda" and not og.is_cuda_available():
            raise IncompatibleEngine(
                "Expected ONNX Runtime GenAI with CUDA for this bundle's --device cuda, found the CPU build "
                "(onnxruntime-genai) or no GPU. Install it with: pip install 'enginekit[genai-cuda]' on a machine with "
                f"an NVIDIA GPU, or rebuild for the CPU: {self.manifest.rebuild_command.replace('cuda', 'cpu')}"
            )
        config = og.Config(str(folder))
        # No eos for GenAI (this module stops rows) and a pad id that prompts do not hold; see the module doc.
        overlay: dict[str, Any] = {"model": {"eos_token_id": self.pad, "pad_token_id": self.pad}}
        if not self.paged:  # a paged decoder's engine section (dynamic batching, its block pool) is the builder's
            overlay["engine"] = {"static_batching": {"max_batch_size": self.max_batch}}
        if threads:
            overlay["model"]["decoder"] = {"session_options": {"intra_op_num_threads": int(threads)}}
        config.overlay(json.dumps(overlay))
        config.clear_providers()
        if self.device == "cuda":
            config.append_provider("cuda")
            if cuda_graph:
                config.set_provider_option("cuda", "enable_cuda_graph", "1")
        try:
            return og.Model(config)
        except RuntimeError as exc:
            raise EngineRefused(f"Expected ONNX Runtime GenAI to open '{self.bundle}', but it refused: "
                                f"{str(exc)[:300]}. Rebuild with: {self.manifest.rebuild_command}") from None

    # -- the batch API (token gate, CLI, bench) ---------------------------------------------------------------
    def generate_ids(self, prompts: Sequence[Sequence[int]], options: SamplingOptions | None = None, *,
                     on_token: Callable[[int, int], None] | None = None, record_logits: bool = False,
                     forced: Sequence[Sequence[int]] | None = None,
                     cancel: Callable[[int], bool] | None = None) -> list[Generation]:
        opts = options or SamplingOptions()
        opts.validate()
        self._check_batch(prompts, opts)
        if self.paged:
            return self._run_on_engine(prompts, opts, on_token, record_logits, forced, cancel)
        # Teacher forcing appends tokens after the prompt, which GenAI allows at batch 1 only; a prompt holding
        # the pad id would be masked in a batch. Such batches run row by row (the same tokens, slower).
        if len(prompts) > 1 and (forced is not None or any(self.pad in p for p in prompts)):
            out = []
            for row, p in enumerate(prompts):
                out += self.generate_ids(
                    [p], opts, on_token=(lambda _r, t, row=row: on_token(row, t)) if on_token else None,
                    record_logits=record_logits, forced=[forced[row]] if forced is not None else None,
                    cancel=(lambda _r, row=row: cancel(row)) if cancel else None)
            return out
        try:
            return self._run(prompts, opts, on_token, record_logits, forced, cancel)
        except RuntimeError as exc:  # GenAI's and ONNX Runtime's failures surface as RuntimeError
            raise IncompatibleEngine(
                f"Expected ONNX Runtime GenAI to run bundle '{self.bundle}' on {self.device}, but it failed: "
                f"{str(exc).strip()[:300]}. Rebuild it (another precision or --generator enginekit): "
                f"{self.manifest.rebuild_command}"
            ) from None

    def _run_on_engine(self, prompts: Sequence[Sequence[int]], opts: SamplingOptions,
                       on_token: Callable[[int, int], None] | None, record_logits: bool,
                       forced: Sequence[Sequence[int]] | None, cancel: Callable[[int], bool] | None) -> list[Generation]:
        """A batch as concurrent Engine requests (a PagedAttention decoder): the same rows, no logits."""
        if record_logits or forced is not None:
            raise UsageError(
                f"Expected a bundle whose decoder og.Generator runs for per-step logits or teacher forcing, found the "
                f"PagedAttention decoder of '{self.bundle}', which only GenAI's Engine runs (it returns tokens). Build "
                "with --genai-attention default for logits."
            )

        def sink(row: int) -> Callable[[int], None]:
            def take(token: int) -> None:
                if cancel is not None and cancel(row):
                    handles[row].cancel()
                elif on_token is not None:
                    on_token(row, token)
            return take

        handles: list[RequestHandle] = []
        for row, p in enumerate(prompts):
            handles.append(self.submit(p, opts, on_token=sink(row)))
        return [h.future.result() for h in handles]

    def _model_for(self, batch: int) -> Any:
        """The model a batch runs on: GenAI 0.18 captures CUDA graphs for batch 1 only ("batch_size must be 1
        when sequence_length > 1 and past context is given" at batch 8, measured on the H200), so larger
        batches run on a second model opened without one (the weights are loaded twice)."""
        if batch == 1 or not (self.cuda_graph and self.device == "cuda"):
            return self.model
        with self._open_lock:  # the Engine's thread and a caller may both ask first
            if self._batch_model is None:
                self._batch_model = self._open(self._threads, cuda_graph=False)
        return self._batch_model

    def _params(self, opts: SamplingOptions, batch: int, max_length: int) -> Any:
        params = self.og.GeneratorParams(self._model_for(batch))
        search: dict[str, Any] = {"max_length": max_length, "batch_size": batch, "do_sample": not opts.greedy}
        if not opts.greedy:
            search.update(temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k or self.vocab)
            if opts.seed is not None:
                search["random_seed"] = int(opts.seed)
        params.set_search_options(**search)
        return params

    def _run(self, prompts: Sequence[Sequence[int]], opts: SamplingOptions, on_token: Callable[[int, int], None] | None,
             record_logits: bool, forced: Sequence[Sequence[int]] | None,
             cancel: Callable[[int], bool] | None) -> list[Generation]:
        b, width = len(prompts), max(len(p) for p in prompts)
        ids = np.full((b, width), self.pad, np.int32)
        for row, p in enumerate(prompts):
            ids[row, :len(p)] = p  # right-padded: see the module doc
        steps = min(opts.max_new_tokens, self.max_length - width)
        stop = self.stop_tokens(opts)
        results = [Generation(list(map(int, p)), []) for p in prompts]
        done = np.zeros(b, bool)
        t0 = time.perf_counter()
        gen = self.og.Generator(self._model_for(b), self._params(opts, b, width + steps))
        try:
            gen.append_tokens(ids)
            t_first = t0
            for step in range(steps):
                logits = gen.get_logits().reshape(b, -1) if record_logits else None
                if forced is not None:
                    chosen = np.array([f[step] if step < len(f) else self.pad for f in forced], np.int32)
                else:
                    gen.generate_next_token()
                    chosen = gen.get_next_tokens().reshape(b)
                take_step(results, done, chosen, logits, stop, on_token, cancel)
                if step == 0:
                    t_first = time.perf_counter()
                if done.all() or step == steps - 1:
                    break
                if forced is not None:
                    gen.append_tokens(chosen[:, None])
            t_end = time.perf_counter()  # before the generator is freed: its teardown is not decoding
        finally:
            del gen
        for r in results:
            r.ttft_ms, r.decode_ms = (t_first - t0) * 1e3, (t_end - t_first) * 1e3
        return results

    # -- the request API (the OpenAI server): GenAI's continuous batching --------------------------------------
    def submit(self, prompt_ids: Sequence[int], options: SamplingOptions | None,
               on_token: Callable[[int], None] | None = None) -> RequestHandle:
        """Queue one prompt on GenAI's Engine (continuous batching); on_token(id) runs on the engine's thread.
        The handle's future resolves to its Generation (finish_reason stop, length or cancelled)."""
        opts = options or SamplingOptions()
        opts.validate()
        self._check_batch([prompt_ids], opts)
        if self._engine is None:
            self._engine = _EngineThread(self)
        handle = RequestHandle(list(map(int, prompt_ids)), opts, on_token, self.stop_tokens(opts))
        self._engine.put(handle)
        return handle

    def close(self) -> None:
        if self._engine is not None:
            self._engine.stop()
            self._engine = None
        self.model = self._batch_model = None

    def __enter__(self) -> GenaiGenerator:
        return self


class RequestHandle:
    """One submitted prompt: `future` resolves to its Generation; cancel() ends it at the next step."""

    def __init__(self, prompt: list[int], options: SamplingOptions, on_token: Callable[[int], None] | None,
                 stop: set[int]):
        self.prompt, self.options, self.on_token, self.stop = prompt, options, on_token, stop
        self.future: Future[Generation] = Future()
        self.cancelled = threading.Event()
        self.result = Generation(prompt, [])
        self.t0 = time.perf_counter()
        self.t_first: float | None = None

    def cancel(self) -> None:
        self.cancelled.set()


class _EngineThread:
    """The thread that owns an og.Engine: takes new requests between steps, runs a step, hands out tokens."""

    def __init__(self, gen: GenaiGenerator):
        self.gen, self.og = gen, gen.og
        self.inbox: queue.Queue[RequestHandle | None] = queue.Queue()
        self.thread = threading.Thread(target=self._main, name="genai-engine", daemon=True)
        self.thread.start()

    def put(self, handle: RequestHandle) -> None:
        self.inbox.put(handle)

    def stop(self) -> None:
        self.inbox.put(None)
        self.thread.join(timeout=30)

    def _main(self) -> None:
        og = self.og
        # Not on the CUDA-graph model: GenAI's Engine ran 8 requests at 221 tok/s each with a graph, 322 without
        # (H200, Qwen2.5-1.5B sizes, BF16; bench/results/gpu-h200-2026-12-01/issue-18/genai_probe.json)
        # A PagedAttention decoder's Engine keeps the graph: 392 tok/s per request at 8 with it, 266 without.
        engine = og.Engine(self.gen.model if self.gen.paged else self.gen._model_for(max(2, self.gen.max_batch)))
        buffer = engine.create_event_buffer(256)
        live: dict[int, tuple[Any, RequestHandle]] = {}  # id(og request) → (request, handle)
        running = True
        while running or live:
            block = not live
            while True:
                try:
                    handle = self.inbox.get(block=block, timeout=None if block else 0)
                except queue.Empty:
                    break
                block = False
                if handle is None:
                    running = False
                    for _, h in live.values():
                        h.cancelled.set()
                    continue
                try:
                    request = self._begin(engine, handle)
                except Exception as exc:  # a request the engine refuses fails alone
                    handle.future.set_exception(InvalidInput(f"Expected ONNX Runtime GenAI to take the request, "
                                                             f"found: {str(exc)[:300]}"))
                    continue
                live[id(request)] = (request, handle)
            for key, (_, handle) in list(live.items()):
                if handle.cancelled.is_set():
                    self._finish(live, key, "cancelled")
            if not live:
                continue
            try:
                events = engine.run(buffer)
            except Exception as exc:  # an engine failure fails every running request, not the thread
                for key, (_, handle) in list(live.items()):
                    live.pop(key)
                    handle.future.set_exception(exc)
                continue
            for event in events:
                key = id(event.request)
                if key not in live:
                    continue
                _, handle = live[key]
                flags = int(event.flags.value)
                if flags & int(og.EngineEventFlags.TOKEN.value):
                    self._token(live, key, handle, int(event.token))
                if key in live and flags & (int(og.EngineEventFlags.TURN_FINISHED.value) |
                                            int(og.EngineEventFlags.FAILED.value)):
                    failed = flags & int(og.EngineEventFlags.FAILED.value)
                    self._finish(live, key, "error" if failed else "length")

    def _begin(self, engine: Any, handle: RequestHandle) -> Any:
        og, opts = self.og, handle.options
        steps = min(opts.max_new_tokens, self.gen.max_length - len(handle.prompt))
        ro = og.RequestOptions()
        ro.set_max_session_tokens(len(handle.prompt) + steps)
        request = engine.create_request(options=ro)
        turn = og.TurnOptions(request)
        turn.set_max_generated_tokens(steps)
        turn.set_do_sample(not opts.greedy)
        if not opts.greedy:
            turn.set_temperature(opts.temperature)
            turn.set_top_p(opts.top_p)
            turn.set_top_k(opts.top_k)
            if opts.seed is not None:
                turn.set_seed(int(opts.seed))
        request.begin_turn(np.array(handle.prompt, np.int32), turn)
        return request

    def _token(self, live: dict[int, tuple[Any, RequestHandle]], key: int, handle: RequestHandle, token: int) -> None:
        if handle.t_first is None:
            handle.t_first = time.perf_counter()
        handle.result.tokens.append(token)
        if handle.on_token is not None:
            try:
                handle.on_token(token)
            except Exception:  # a consumer's failure cancels its own request only
                handle.cancelled.set()
        if token in handle.stop:
            self._finish(live, key, "stop")

    def _finish(self, live: dict[int, tuple[Any, RequestHandle]], key: int, reason: str) -> None:
        request, handle = live.pop(key)
        try:
            request.close()
        except Exception:
            pass
        now = time.perf_counter()
        r = handle.result
        r.finish_reason = reason
        first = handle.t_first or now
        r.ttft_ms, r.decode_ms = (first - handle.t0) * 1e3, (now - first) * 1e3
        if reason == "error":
            handle.future.set_exception(InvalidInput("Expected ONNX Runtime GenAI to finish the request, but its "
                                                     "engine reported a failure for it."))
        else:
            handle.future.set_result(r)
