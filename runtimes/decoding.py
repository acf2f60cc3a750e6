"""The decoding loop of a generation bundle, without torch: tokenizer, prefill, decode steps,
sampling (the public entry point is runtimes.generate.load_generator, which picks the loop).

    from runtimes.generate import load_generator
    with load_generator("engines/smollm2-ort-fp32") as g:
        print(g.generate("The capital of France is", SamplingOptions(max_new_tokens=32)).text)

A generation bundle (written by `enginekit build` for a causal LM) holds two engines, `prefill`
and `decode` (exporter/export/generation.py), the tokenizer (`tokenizer.json`, read by the `tokenizers`
package) and `generation.json` (the engines' io, the KV-cache layout, stop tokens).

The KV cache never leaves the engine's device between steps:
- CPU: the present key/value arrays of step n are the past inputs of step n+1 (no copies);
- CUDA: every step runs through an ORT IO binding; the present outputs stay OrtValues on the GPU
  that are bound as the next step's past inputs. Only the token ids, positions and mask go up
  (a few bytes a row) and only `next_token` comes back, or the logits when sampling.
Prompts of different lengths are left-padded; positions count attended tokens only, as
transformers' generate() computes them, so the same tokens come out.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ._deps import require
from .errors import IncompatibleEngine, InvalidInput, UsageError
from .manifest import IOSpec, Manifest, verify_files
from .onegraph import OneGraphSteps

GENERATION_FILE = "generation.json"
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class SamplingOptions:
    """Defaults: greedy (temperature 0), 64 new tokens, the bundle's stop tokens. temperature > 0
    samples from softmax(logits / temperature), restricted to the top_k most likely tokens (0: all)
    and to the smallest set whose probability reaches top_p; `seed` makes it repeatable."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: Sequence[int] | None = None  # None: the bundle's end-of-sequence tokens
    add_special_tokens: bool = True
    # Beam search (seq2seq bundles, runtimes/seq2seq.py): beams per source; None: the bundle's generation config.
    num_beams: int = 1
    length_penalty: float | None = None
    early_stopping: bool | str | None = None

    def validate(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens {self.max_new_tokens} (expected >= 1)")
        if self.temperature < 0:
            problems.append(f"temperature {self.temperature} (expected >= 0; 0 is greedy)")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p {self.top_p} (expected in (0, 1])")
        if self.top_k < 0:
            problems.append(f"top_k {self.top_k} (expected >= 0; 0 keeps every token)")
        if self.num_beams < 1:
            problems.append(f"num_beams {self.num_beams} (expected >= 1; 1 is no beam search)")
        if self.early_stopping not in (None, True, False, "never"):
            problems.append(f"early_stopping {self.early_stopping!r} (expected True, False or 'never')")
        if problems:
            raise UsageError(f"Expected valid sampling options, found {'; '.join(problems)}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Generation:
    """One prompt's continuation: its token ids, text, why it stopped, and the time it took."""

    prompt_tokens: list[int]
    tokens: list[int]
    text: str = ""
    finish_reason: str = "length"  # "stop" (a stop token), "length" (max_new_tokens or the engine's max), "cancelled"
    ttft_ms: float = 0.0  # prefill + first token
    decode_ms: float = 0.0  # the remaining tokens
    logits: list[np.ndarray] = field(default_factory=list, repr=False)  # per step, when record_logits

    @property
    def tokens_per_s(self) -> float:
        return (len(self.tokens) - 1) / (self.decode_ms / 1e3) if self.decode_ms > 0 and len(self.tokens) > 1 else 0.0


def take_step(results: list[Generation], done: np.ndarray, chosen: np.ndarray, logits: np.ndarray | None,
              stop: set[int], on_token: Callable[[int, int], None] | None,
              cancel: Callable[[int], bool] | None) -> None:
    """One decoding step's bookkeeping for every row still running (both loops: this module's and
    runtimes/genai.py's): a cancelled row finishes as "cancelled", the others take their chosen token
    (and its logits [batch, vocab] when recorded), tell on_token(row, id), and finish at a stop token."""
    for row in range(len(results)):
        if not done[row] and cancel is not None and cancel(row):
            done[row], results[row].finish_reason = True, "cancelled"
        if done[row]:
            continue
        tok = int(chosen[row])
        results[row].tokens.append(tok)
        if logits is not None:
            results[row].logits.append(np.array(logits[row], np.float32))
        if on_token:
            on_token(row, tok)
        if tok in stop:
            done[row], results[row].finish_reason = True, "stop"


def sample_next(logits: np.ndarray, options: SamplingOptions, rng: np.random.Generator) -> np.ndarray:
    """Next token per row of `logits` [batch, vocab] (temperature, top-k, top-p)."""
    x = logits.astype(np.float64) / options.temperature
    if options.top_k and options.top_k < x.shape[-1]:
        kth = np.partition(x, -options.top_k, axis=-1)[:, -options.top_k][:, None]
        x = np.where(x < kth, -np.inf, x)
    x -= x.max(axis=-1, keepdims=True)
    p = np.exp(x)
    p /= p.sum(axis=-1, keepdims=True)
    out = np.empty(len(p), np.int64)
    for row, probs in enumerate(p):
        order = np.argsort(-probs, kind="stable")
        if options.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs[order]), options.top_p) + 1)
            order = order[:keep]
        q = probs[order] / probs[order].sum()
        out[row] = order[rng.choice(len(order), p=q)]
    return out


class Tokenizer:
    """The bundle's tokenizer.json through the `tokenizers` package (the same file transformers reads)."""

    def __init__(self, path: Path):
        tk = require("tokenizers", extra="cpu", purpose="Tokenizing prompts for generation")
        self._tok = tk.Tokenizer.from_file(str(path))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))


class _CudaStep:
    """One engine run through an IO binding: host inputs go up, the past stays on the GPU."""

    def __init__(self, session: Any, cache_out: list[str]):
        self.session = session
        self.cache_out = cache_out

    def run(self, host: dict[str, np.ndarray], past: dict[str, Any], want_logits: bool,
            cache_out: list[str] | None = None) -> tuple[Any, list[Any]]:
        """cache_out: the device-resident outputs after logits and next_token (default: the present cache)."""
        binding = self.session.io_binding()
        for name, arr in host.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(arr))
        for name, value in past.items():
            if isinstance(value, np.ndarray):  # a cache reordered on the host (seq2seq beam search)
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cuda")
        binding.bind_output("next_token", "cpu")
        for name in self.cache_out if cache_out is None else cache_out:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        logits = values[0].numpy() if want_logits else None
        return (logits, values[1].numpy()), values[2:]


def _read_spec(bundle: Path, manifest: Manifest) -> dict[str, Any]:
    """generation.json, checked to name only engine files the manifest lists (IncompatibleEngine otherwise)."""
    path = manifest.file(bundle, GENERATION_FILE, "generation spec")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        files = [c["file"] for c in spec["components"].values()]
        if "vision" in spec:
            files.append(spec["vision"]["file"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IncompatibleEngine(
            f"Expected {path} to be the generation spec enginekit wrote, but it cannot be read ({type(exc).__name__}: "
            f"{str(exc)[:200]}). Rebuild the bundle with: {manifest.rebuild_command}"
        ) from None
    unlisted = [f for f in files if f not in manifest.target.engine_files]
    if unlisted:
        raise IncompatibleEngine(
            f"Expected {path} to name only the bundle's engine files ({', '.join(manifest.target.engine_files)}), "
            f"found {[str(f)[:200] for f in unlisted]}. An unlisted engine is never run. Rebuild the bundle with: "
            f"{manifest.rebuild_command}"
        )
    return dict(spec)


class Generator:
    """Runs a generation bundle. device: None (the bundle's), 'cpu' or 'cuda'; threads: CPU intra-op
    threads (None: ORT's default); verify: check the files' sha256 against the manifest; cuda_graph: replay the
    decode step as a captured CUDA graph, for a one-graph decoder on CUDA (runtimes/onegraph.py; None: there, when
    ONNX Runtime can capture it, `cuda_graph_error` says why not otherwise)."""

    def __init__(self, bundle: str | Path, *, device: str | None = None, threads: int | None = None,
                 verify: bool = True, session_factory: Callable[[str], Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]] | None = None,
                 cuda_graph: bool | None = None):
        from .ort.runner import OrtRunner

        self.bundle = Path(bundle)
        self.manifest = Manifest.read(self.bundle)
        spec_path = self.bundle / GENERATION_FILE
        if GENERATION_FILE not in self.manifest.files or not spec_path.is_file():
            raise IncompatibleEngine(
                f"Expected a generation bundle (with {GENERATION_FILE}, written by `enginekit build` for a causal LM) "
                f"at '{self.bundle}', found a bundle for task '{self.manifest.source.get('task')}'. Run it with "
                "runtimes.load(bundle), or build the causal LM with `enginekit build hf:DIR`."
            )
        if verify:
            verify_files(self.bundle, self.manifest)
        self.spec = _read_spec(self.bundle, self.manifest)
        tok = self.spec.get("tokenizer")
        self._tokenizer = Tokenizer(self.manifest.file(self.bundle, tok, "tokenizer")) if tok else None
        self.device = device or self.manifest.target.device
        self.io = {name: IOSpec.from_dict(c["io"]) for name, c in self.spec["components"].items()}
        # The engine each step runs: a prefill and a decode graph, or one decoder graph for both (a VLM decoder
        # written by ONNX Runtime GenAI's builder: weights held once, the prefill with an empty past, rows
        # right-padded; exporter/export/vlm_decoder.py).
        self.stages = {"prefill": "prefill", "decode": "decode", **(self.spec.get("stages") or {})}
        decode = self.io[self.stages["decode"]]
        self.one_graph = self.stages["prefill"] == self.stages["decode"]
        self.right_padded = self.spec.get("padding") == "right"
        self.cache_in = [s.name for s in decode.inputs if s.name.startswith("past_key_values.")]
        self.cache_out = [s.name for s in decode.outputs if s.name.startswith("present.")]
        self.max_length = decode.dims["total_sequence"].max
        self.max_batch = decode.dims["batch"].max
        self.eos = [int(t) for t in self.spec.get("eos_token_ids", [])]
        self.pad = int(self.spec.get("pad_token_id") if self.spec.get("pad_token_id") is not None else (self.eos or [0])[0])
        # ONNX Runtime's GroupQueryAttention rotates each token at its index in the cache, not at
        # position_ids: a left-padded row then counts its padding. Rotary attention depends only on
        # relative positions, so such bundles feed those indices (the same attention scores); the
        # others count attended tokens, as transformers does (learned absolute positions need it).
        self.absolute_positions = self.spec.get("positions") == "absolute"
        self._runners: dict[str, Any] = {}
        self._fns: dict[str, Any] = {}
        self._one: OneGraphSteps | None = None
        self.cuda_graph, self.cuda_graph_error = False, None
        if session_factory is not None:  # the build's emulated FP16/BF16 check plugs its graphs in here
            if self.one_graph:
                raise UsageError("Expected separate prefill and decode graphs for session_factory, found a one-graph "
                                 f"decoder in '{self.bundle}' (its cache lives in the session's shared buffers).")
            self._fns = {name: session_factory(name) for name in self.io}
            self.device = "cpu"
            return
        graph = self._graph_wanted(cuda_graph)
        for name, component in self.spec["components"].items():
            sub = replace(self.manifest, io=self.io[name],
                          target=replace(self.manifest.target, engine_files=[component["file"]]))
            if graph and name == self.stages["decode"]:
                try:  # the one session opened for capture: the weights are held once
                    self._runners[name] = OrtRunner(self.bundle, sub, device=self.device, threads=threads,
                                                    graph_session=True)
                    self.cuda_graph = True
                    continue
                except IncompatibleEngine as exc:
                    if cuda_graph:
                        raise
                    self.cuda_graph_error = str(exc)
            self._runners[name] = OrtRunner(self.bundle, sub, device=self.device, threads=threads)
        if self.one_graph:
            runner = self._runners[self.stages["decode"]]
            self._one = OneGraphSteps(self, runner.session, runner.ort, graph=self.cuda_graph)
        if self.device == "cuda":
            self._cuda = {n: _CudaStep(r.session, self.cache_out) for n, r in self._runners.items()}

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise UsageError(
                f"Expected a tokenizer in bundle '{self.bundle}' to generate from text, found none (the model folder had "
                "no tokenizer when it was built). Generate from token ids with generate_ids(), or rebuild from a folder "
                "that holds tokenizer.json."
            )
        return self._tokenizer

    # -- public API ---------------------------------------------------------------------------------------
    def generate(self, prompt: str, options: SamplingOptions | None = None,
                 on_text: Callable[[str], None] | None = None) -> Generation:
        """The continuation of one prompt; on_text receives the text as it is produced (streaming)."""
        opts = options or SamplingOptions()
        ids = self.tokenizer.encode(prompt, add_special_tokens=opts.add_special_tokens)
        stream = _TextStream(self.tokenizer, on_text) if on_text else None
        result = self.generate_ids([ids], opts, on_token=(lambda _row, tok: stream.push(tok)) if stream else None)[0]
        result.text = self.tokenizer.decode(result.tokens)
        return result

    def generate_batch(self, prompts: Sequence[str], options: SamplingOptions | None = None) -> list[Generation]:
        opts = options or SamplingOptions()
        batch = [self.tokenizer.encode(p, add_special_tokens=opts.add_special_tokens) for p in prompts]
        results = self.generate_ids(batch, opts)
        for r in results:
            r.text = self.tokenizer.decode(r.tokens)
        return results

    def generate_ids(self, prompts: Sequence[Sequence[int]], options: SamplingOptions | None = None, *,
                     on_token: Callable[[int, int], None] | None = None, record_logits: bool = False,
                     forced: Sequence[Sequence[int]] | None = None,
                     cancel: Callable[[int], bool] | None = None) -> list[Generation]:
        """Continuations of token-id prompts (a batch, left-padded). forced: feed these tokens instead
        of the chosen ones (teacher forcing: the parity gate's per-step logits); on_token(row, id);
        cancel(row): asked before each step, True finishes that row as "cancelled"."""
        opts = options or SamplingOptions()
        opts.validate()
        if opts.num_beams > 1:
            raise UsageError(f"Expected num_beams 1 for a causal LM bundle, found {opts.num_beams}: beam search is built "
                             "for encoder-decoder (seq2seq) bundles in this version. Sample, or decode greedily.")
        self._check_batch(prompts, opts)
        ids, mask = self._pad(prompts)
        if self.absolute_positions:
            positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
        else:
            positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        return self._loop(prompts, {"input_ids": ids, "attention_mask": mask, "position_ids": positions}, opts,
                          on_token=on_token, record_logits=record_logits, forced=forced, cancel=cancel)

    def _pad(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded ids and their attention mask [batch, longest prompt] (right-padded for a one-graph decoder,
        whose GroupQueryAttention reads each row's tokens from its front)."""
        width = max(len(p) for p in prompts)
        ids = np.full((len(prompts), width), self.pad, np.int64)
        mask = np.zeros((len(prompts), width), np.int64)
        for row, p in enumerate(prompts):
            cols = slice(0, len(p)) if self.right_padded else slice(width - len(p), width)
            ids[row, cols] = p
            mask[row, cols] = 1
        return ids, mask

    def _token_inputs(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """The decode step's token input (a VLM's decoder takes their embeddings instead)."""
        return {"input_ids": tokens}

    def _loop(self, prompts: Sequence[Sequence[int]], prefill: dict[str, np.ndarray], opts: SamplingOptions, *,
              on_token: Callable[[int, int], None] | None, record_logits: bool,
              forced: Sequence[Sequence[int]] | None,
              cancel: Callable[[int], bool] | None = None) -> list[Generation]:
        """The prefill/decode loop shared by causal LMs and VLMs, from the prefill's feeds."""
        stop = self.stop_tokens(opts)
        rng = np.random.default_rng(opts.seed)
        b = len(prompts)
        width = prefill["attention_mask"].shape[1]
        mask, positions = prefill["attention_mask"], prefill["position_ids"]
        results = [Generation(list(map(int, p)), []) for p in prompts]
        done = np.zeros(b, bool)
        steps = min(opts.max_new_tokens, self.max_length - width)
        need_logits = record_logits or not opts.greedy
        t0 = time.perf_counter()
        if self._one is not None:
            self._one.begin(b, width + steps)
        (logits, greedy), past = self._step("prefill", prefill, {}, need_logits)
        t_first = 0.0
        for step in range(steps):
            chosen = greedy[:, 0] if opts.greedy else sample_next(logits[:, 0], opts, rng)
            if forced is not None:
                chosen = np.array([f[step] if step < len(f) else self.pad for f in forced], np.int64)
            take_step(results, done, chosen, logits[:, 0] if record_logits else None, stop, on_token, cancel)
            if step == 0:
                t_first = time.perf_counter()
            if done.all() or step == steps - 1:
                break
            chosen = np.where(done, self.pad, chosen).astype(np.int64)
            mask = np.concatenate([mask, np.ones((b, 1), np.int64)], axis=1)
            # The next position after each row's largest ([batch, 1], or [3, batch, 1] for M-RoPE: text after the
            # prompt counts up from its largest position over all three rows, as transformers' rope delta does;
            # the largest, not the last column: padding sits at the end of right-padded rows).
            positions = positions.max(axis=-1, keepdims=True) + 1
            if positions.ndim == 3:
                positions = np.broadcast_to(positions.max(axis=0, keepdims=True), positions.shape).copy()
            (logits, greedy), past = self._step("decode", {**self._token_inputs(chosen[:, None]), "attention_mask": mask,
                                                           "position_ids": positions}, past, need_logits)
        t_end = time.perf_counter()
        for r in results:
            r.ttft_ms = (t_first - t0) * 1e3
            r.decode_ms = (t_end - t_first) * 1e3
        return results

    def close(self) -> None:
        for r in self._runners.values():
            r.close()
        self._runners.clear()
        self._fns.clear()

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def room(self, prompts: Sequence[Sequence[int]]) -> int:
        """How many new tokens the engines' total length leaves after these prompts."""
        return self.max_length - max(len(p) for p in prompts)

    def stop_tokens(self, opts: SamplingOptions) -> set[int]:
        """The ids that end a row: the options' stop_token_ids, else the bundle's end-of-sequence ids."""
        return set(self.eos if opts.stop_token_ids is None else opts.stop_token_ids)

    def vocab_size(self) -> int | None:
        """Valid token ids are 0 .. vocab_size - 1 (the input_ids range recorded at build time)."""
        hints = [io.values.get("input_ids") for io in self.io.values()]
        return next((int(h["high"]) for h in hints if h and h.get("kind") == "randint"), None)

    # -- internals ------------------------------------------------------------------------------------------
    def _graph_wanted(self, cuda_graph: bool | None) -> bool:
        """Whether to open the one-graph decoder for CUDA graph capture (None: wherever it is one on CUDA)."""
        able = self.one_graph and self.device == "cuda"
        if cuda_graph and not able:
            raise UsageError(
                f"Expected cuda_graph=True only for a one-graph decoder on CUDA (a VLM bundle built --device cuda), "
                f"found {'device ' + repr(self.device) if self.one_graph else 'separate prefill and decode graphs'} "
                f"for '{self.bundle}'. Drop cuda_graph (a causal LM built by ONNX Runtime GenAI's builder captures "
                "its decode step in runtimes.genai), or open the bundle on CUDA."
            )
        return able and cuda_graph is not False

    def _check_batch(self, prompts: Sequence[Sequence[int]], opts: SamplingOptions) -> None:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise InvalidInput("Expected at least one prompt of at least one token, found an empty prompt or batch.")
        if len(prompts) > self.max_batch:
            raise InvalidInput(f"Expected at most {self.max_batch} prompts at once (the engine's batch range), "
                               f"found {len(prompts)}. Split them, or rebuild with --shapes batch=1:1:{len(prompts)}.")
        vocab = self.vocab_size()
        bad = sorted({int(t) for p in prompts for t in p if not 0 <= int(t) < vocab}) if vocab else []
        if bad:
            raise InvalidInput(
                f"Expected token ids in 0..{vocab - 1} (the vocabulary the manifest records), found {bad[:8]}. "
                "A negative id would silently read another token's embedding row; tokenize with the bundle's tokenizer."
            )
        width = max(len(p) for p in prompts)
        if self.room(prompts) <= 0:  # room(): what the loop's total length leaves (seq2seq: the decoder's alone)
            raise InvalidInput(
                f"Expected a prompt shorter than the engine's maximum length {self.max_length}, found {width} tokens. "
                f"Shorten it, or rebuild with --shapes total_sequence=1:{self.max_length}:{2 * width + opts.max_new_tokens}."
            )

    def _step(self, name: str, host: dict[str, np.ndarray], past: dict[str, Any],
              want_logits: bool) -> tuple[tuple[Any, np.ndarray], dict[str, Any]]:
        """Run one step's component; returns ((logits or None, next_token), the past for the next step)."""
        if self._one is not None:  # a one-graph decoder: its cache lives in OneGraphSteps
            return self._one.run(host, want_logits, decode=name == "decode"), {}
        name = self.stages.get(name, name)
        if self.device == "cuda":
            out, present = self._cuda[name].run(host, past, want_logits)
            return out, dict(zip(self.cache_in, present))
        feeds = {**host, **past}
        if self._fns:
            outs = self._fns[name](feeds)
        else:
            session = self._runners[name].session
            names = ["logits", "next_token", *self.cache_out]
            outs = dict(zip(names, session.run(names, feeds)))
        return (outs["logits"], outs["next_token"]), {i: outs[o] for i, o in zip(self.cache_in, self.cache_out)}


class _TextStream:
    """Turns token ids into text pieces as they come: decodes the whole continuation each time and
    emits what is new, holding back a trailing partial UTF-8 character (shown as U+FFFD)."""

    def __init__(self, tokenizer: Tokenizer, sink: Callable[[str], None]):
        self.tokenizer, self.sink = tokenizer, sink
        self.ids: list[int] = []
        self.sent = 0

    def push(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or len(text) <= self.sent:
            return
        self.sink(text[self.sent:])
        self.sent = len(text)
