"""The decoding loop of an encoder-decoder (seq2seq) bundle, without torch: greedy, sampling and beam search.

    from runtimes.generate import SamplingOptions, load_generator
    with load_generator("engines/t5-small-ort-fp32") as g:
        print(g.generate("translate English to German: The house is wonderful.").text)
        print(g.generate("summarize: ...", SamplingOptions(num_beams=4)).text)

The bundle (exporter/recipes/seq2seq.py) holds a `prefill` engine (the encoder, every layer's cross-attention
keys/values, and the decoder on its start tokens) and a `decode` engine (one decoder step from the
self-attention cache and those cross keys/values), the tokenizer and generation.json. The source text is
the encoder's input; `Generation.tokens` are the decoder's new tokens (after its start tokens), as
transformers' generate() returns them after the decoder_start_token_id.

Beam search follows transformers' (num_beams hypotheses per row, 2 × num_beams candidates per step,
length_penalty on finished hypotheses, early_stopping True / False / "never" as its generation config
says); sampling and greedy as runtimes.decoding. Beam rows reorder the self-attention cache with numpy
on the host every step: on CUDA the cache round-trips through host memory then (greedy and sampling
keep it on the device).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .decoding import Generation, Generator, SamplingOptions, sample_next, take_step
from .errors import UsageError

SEQ2SEQ = "seq2seq"  # generation.json "architecture"


class Seq2SeqGenerator(Generator):
    """Runs a seq2seq bundle (see the module docstring); the constructor is Generator's."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.cross = [s.name for s in self.io["decode"].inputs if s.name.startswith("cross.")]
        self.start = [int(t) for t in self.spec.get("decoder_start_ids") or [0]]
        self.forced_bos = self.spec.get("forced_bos_token_id")
        self.forced_eos = self.spec.get("forced_eos_token_id")
        self.suppress = [int(t) for t in self.spec.get("suppress_token_ids") or []]
        self.begin_suppress = [int(t) for t in self.spec.get("begin_suppress_token_ids") or []]
        self.features = self.spec.get("features")  # a speech model's log-mel settings (Whisper), else None
        self.image = self.spec.get("image")  # a captioning model's preprocessing (BLIP), else None
        self.audio = self.features is not None
        self.source = self.io["prefill"].inputs[0]  # input_ids, input_features or pixel_values
        self.fixed = self.source.name != "input_ids"  # features or pixels of one fixed shape
        dims = self.io["prefill"].dims
        self.max_source = dims["sequence"].max if "sequence" in dims else 0
        self.defaults = dict(self.spec.get("beam") or {})
        self._mel_filters: np.ndarray | None = None

    def generate_ids(self, prompts: Sequence[Sequence[int]], options: SamplingOptions | None = None, *,
                     on_token: Callable[[int, int], None] | None = None, record_logits: bool = False,
                     forced: Sequence[Sequence[int]] | None = None,
                     cancel: Callable[[int], bool] | None = None) -> list[Generation]:
        """The decoder's tokens for each source (a batch, right-padded with the encoder's mask); the
        arguments are Generator.generate_ids's, and options.num_beams > 1 runs beam search."""
        opts = options or SamplingOptions()
        opts.validate()
        start = np.tile(np.array([self.start], np.int64), (len(prompts), 1))
        if self.fixed:
            feeds = {self.source.name: self._check_features(prompts), "decoder_input_ids": start}
        else:
            self._check_sources(prompts)
            ids, mask = self._right_pad(prompts)
            feeds = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": start}
        if opts.num_beams > 1:
            if forced is not None or record_logits or not opts.greedy:
                raise UsageError("Expected greedy options for beam search (temperature 0, no forced tokens or recorded "
                                 "logits), found otherwise: pick num_beams=1 to sample or to record logits.")
            return self._beam(prompts, feeds, opts, on_token, cancel)
        return self._greedy(prompts, feeds, opts, on_token=on_token, record_logits=record_logits, forced=forced,
                            cancel=cancel)

    def transcribe(self, audio: Sequence[np.ndarray] | Sequence[str], options: SamplingOptions | None = None, *,
                   rate: int | None = None) -> list[Generation]:
        """A speech bundle's text for each clip: .wav paths, or sample arrays at `rate` Hz (default: the model's);
        up to 30 s each (longer clips are cut, as Whisper's feature extractor does)."""
        from .speech import log_mel, read_wav, resample

        if not self.audio:
            raise UsageError(f"Expected a speech bundle (Whisper) to transcribe audio, found a text encoder-decoder at "
                             f"'{self.bundle}'. Pass text: generate(text).")
        f = self.features
        assert f is not None
        clips = []
        for clip in audio:
            if isinstance(clip, (str, Path)):
                samples, got = read_wav(clip)
            else:
                samples, got = np.asarray(clip, np.float32), int(rate or f["sampling_rate"])
            clips.append(resample(samples, got, int(f["sampling_rate"])))
        feats = [log_mel(c, self.mel_filters(), n_fft=f["n_fft"], hop_length=f["hop_length"], n_samples=f["n_samples"])
                 for c in clips]
        results = self.generate_ids(feats, options)
        for r in results:
            r.text = self.tokenizer.decode(r.tokens)
        return results

    def caption(self, images: Sequence[np.ndarray], options: SamplingOptions | None = None) -> list[Generation]:
        """A captioning bundle's text for each image: HxWx3 uint8 RGB at the bundle's size (self.image["size"]; the
        CLI resizes with PIL's bicubic filter, as the model's image processor does), rescaled and normalized here."""
        from .errors import InvalidInput

        if self.image is None:
            raise UsageError(f"Expected a captioning bundle (BLIP) to caption images, found another encoder-decoder at "
                             f"'{self.bundle}'.")
        size = tuple(int(v) for v in self.image["size"])
        mean = np.asarray(self.image["mean"], np.float32)[:, None, None]
        std = np.asarray(self.image["std"], np.float32)[:, None, None]
        pixels = []
        for im in images:
            arr = np.asarray(im)
            if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[:2] != size:
                raise InvalidInput(f"Expected RGB images of {size[0]}×{size[1]} (HxWx3, the bundle's size), found shape "
                                   f"{arr.shape}. Resize them first (enginekit generate --image does, with --resize).")
            chw = arr.astype(np.float32).transpose(2, 0, 1) * np.float32(self.image["rescale"])
            pixels.append((chw - mean) / std)
        results = self.generate_ids(pixels, options)
        for r in results:
            r.text = self.tokenizer.decode(r.tokens)
        return results

    def mel_filters(self) -> np.ndarray:
        if self._mel_filters is None:
            assert self.features is not None
            self._mel_filters = np.load(self.manifest.file(self.bundle, self.features["file"], "mel filter bank"))
        return self._mel_filters

    def generate(self, prompt: str, options: SamplingOptions | None = None,
                 on_text: Callable[[str], None] | None = None) -> Generation:
        if self.audio:
            raise UsageError(f"Expected audio for the speech bundle '{self.bundle}' (Whisper), found a text prompt. "
                             "Transcribe a .wav file: enginekit generate BUNDLE --audio FILE.wav, or transcribe().")
        if self.image is not None:
            raise UsageError(f"Expected an image for the captioning bundle '{self.bundle}' (BLIP), found a text prompt. "
                             "Caption a photo: enginekit generate BUNDLE --image PHOTO.jpg, or caption().")
        return super().generate(prompt, options, on_text)

    # -- greedy / sampling ----------------------------------------------------------------------------------
    def _greedy(self, prompts: Sequence[Sequence[int]], feeds: dict[str, np.ndarray], opts: SamplingOptions, *,
                on_token: Callable[[int, int], None] | None, record_logits: bool,
                forced: Sequence[Sequence[int]] | None, cancel: Callable[[int], bool] | None) -> list[Generation]:
        stop = self.stop_tokens(opts)
        rng = np.random.default_rng(opts.seed)
        b = len(prompts)
        results = [Generation(self._prompt_tokens(p), []) for p in prompts]
        done = np.zeros(b, bool)
        steps = min(opts.max_new_tokens, self.max_length - len(self.start))
        # Suppressed tokens and a forced first token change the logits: the argmax must be taken here.
        need_logits = record_logits or not opts.greedy or bool(self.suppress or self.begin_suppress) \
            or self.forced_bos is not None or self.forced_eos is not None
        t0 = time.perf_counter()
        (logits, greedy), past, cross = self._prefill(feeds, need_logits)
        t_first = 0.0
        for step in range(steps):
            if need_logits:
                shaped = self._processed(logits[:, 0], step, step == steps - 1)
                chosen = shaped.argmax(-1) if opts.greedy else sample_next(shaped, opts, rng)
            else:
                chosen = greedy[:, 0]
            if forced is not None:
                chosen = np.array([f[step] if step < len(f) else self.pad for f in forced], np.int64)
            take_step(results, done, chosen, logits[:, 0] if record_logits else None, stop, on_token, cancel)
            if step == 0:
                t_first = time.perf_counter()
            if done.all() or step == steps - 1:
                break
            chosen = np.where(done, self.pad, chosen).astype(np.int64)
            (logits, greedy), past = self._step("decode", {"decoder_input_ids": chosen[:, None], **self._mask(feeds)},
                                                {**past, **cross}, need_logits)
        t_end = time.perf_counter()
        for r in results:
            r.ttft_ms, r.decode_ms = (t_first - t0) * 1e3, (t_end - t_first) * 1e3
        return results

    # -- beam search ----------------------------------------------------------------------------------------
    def _beam(self, prompts: Sequence[Sequence[int]], feeds: dict[str, np.ndarray], opts: SamplingOptions,
              on_token: Callable[[int, int], None] | None, cancel: Callable[[int], bool] | None) -> list[Generation]:
        k, b = opts.num_beams, len(prompts)
        if b * k > self.max_batch:
            raise UsageError(f"Expected at most {self.max_batch} rows (the engine's batch range) for {b} source(s) "
                             f"× {k} beams, found {b * k}. Pass fewer sources at once, fewer beams, or rebuild with "
                             f"--shapes batch=1:1:{b * k}.")
        penalty = float(self.defaults.get("length_penalty", 1.0) if opts.length_penalty is None else opts.length_penalty)
        early = self.defaults.get("early_stopping", False) if opts.early_stopping is None else opts.early_stopping
        steps = min(opts.max_new_tokens, self.max_length - len(self.start))
        beams = _Beams(b, k, penalty, early, steps, self.stop_tokens(opts))
        t0 = time.perf_counter()
        (logits, _), past, cross = self._prefill(feeds, True)
        rows = np.repeat(np.arange(b), k)  # every source's prefill row, once per beam
        past = {n: np.asarray(_host(v))[rows] for n, v in past.items()}
        cross = {n: np.asarray(_host(v))[rows] for n, v in cross.items()}
        mask = {k: v[rows] for k, v in self._mask(feeds).items()}
        logits = np.asarray(logits)[rows]
        t_first = 0.0
        for step in range(steps):
            if cancel is not None:
                beams.cancel([row for row in range(b) if cancel(row)])
            logp = self._processed(_log_softmax(logits[:, 0]), step, step == steps - 1)
            order, finished = beams.step(logp, step)
            if step == 0:
                t_first = time.perf_counter()
            if finished:
                break
            past = {n: v[order] for n, v in past.items()}
            (logits, _), past = self._step("decode", {"decoder_input_ids": beams.last(), **mask}, {**past, **cross}, True)
            past = {n: np.asarray(_host(v)) for n, v in past.items()}
            logits = np.asarray(logits)
        t_end = time.perf_counter()
        results = []
        for row, prompt in enumerate(prompts):
            tokens = beams.best(row)
            r = Generation(self._prompt_tokens(prompt), tokens, finish_reason=beams.reason(row, tokens))
            r.ttft_ms, r.decode_ms = (t_first - t0) * 1e3, (t_end - t_first) * 1e3
            for t in tokens if on_token else ():
                on_token(row, t)  # type: ignore[misc]
            results.append(r)
        return results

    def room(self, prompts: Sequence[Sequence[int]]) -> int:
        """New tokens the decoder's length leaves (the source's length is the encoder's, not counted here)."""
        return self.max_length - len(self.start)

    # -- internals ------------------------------------------------------------------------------------------
    def _processed(self, logits: np.ndarray, step: int, last: bool) -> np.ndarray:
        """The logits after the bundle's generation config, as transformers' logits processors: suppressed tokens,
        a forced first token (mBART-50's language), a forced last one (BART's end of sequence at the length limit)."""
        x = np.array(logits, np.float32)
        if self.suppress:
            x[:, self.suppress] = -np.inf
        if step == 0 and self.begin_suppress:  # Whisper: no blank or end of text first
            x[:, self.begin_suppress] = -np.inf
        forced = self.forced_bos if step == 0 else self.forced_eos if last else None
        if forced is not None:
            x[:] = -np.inf
            x[:, int(forced)] = 0.0
        return x

    def _prefill(self, feeds: dict[str, np.ndarray], want_logits: bool) -> tuple[tuple[Any, np.ndarray], dict[str, Any], dict[str, Any]]:
        """The prefill: (logits, next_token), the self-attention past, the cross keys/values (decode inputs)."""
        if self.device == "cuda":
            names = self.cache_out + self.cross
            out, values = self._cuda["prefill"].run(feeds, {}, want_logits, names)
            got = dict(zip(names, values))
        else:
            names = ["logits", "next_token", *self.cache_out, *self.cross]
            if self._fns:
                got = self._fns["prefill"](feeds)
            else:
                got = dict(zip(names, self._runners["prefill"].session.run(names, feeds)))
            out = (got["logits"], got["next_token"])
        past = {i: got[o] for i, o in zip(self.cache_in, self.cache_out)}
        return out, past, {n: got[n] for n in self.cross}

    def _prompt_tokens(self, prompt: Any) -> list[int]:
        return [] if self.fixed else [int(t) for t in prompt]  # a clip's features or an image's pixels are no tokens

    @staticmethod
    def _mask(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The decode step's encoder mask (a speech encoder has none: its 30 s input is never padded in the batch)."""
        return {"attention_mask": feeds["attention_mask"]} if "attention_mask" in feeds else {}

    def _check_features(self, prompts: Sequence[Any]) -> np.ndarray:
        from .errors import InvalidInput

        want = tuple(int(d) for d in self.source.shape[1:])
        bad = [tuple(np.shape(p)) for p in prompts if tuple(np.shape(p)) != want]
        if not prompts or bad:
            what = "log-mel features" if self.audio else "pixel_values"
            how = "transcribe() computes them from audio" if self.audio else "caption() makes them from images"
            raise InvalidInput(f"Expected {what} of shape {want} per input ({how}), found {bad[:4] or 'no inputs'}.")
        if len(prompts) > self.max_batch:
            raise InvalidInput(f"Expected at most {self.max_batch} clips at once (the engine's batch range), found "
                               f"{len(prompts)}. Split them, or rebuild with --shapes batch=1:1:{len(prompts)}.")
        return np.stack([np.asarray(p, np.float32) for p in prompts])

    def _right_pad(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        width = max(len(p) for p in prompts)
        ids = np.full((len(prompts), width), self.pad, np.int64)
        mask = np.zeros((len(prompts), width), np.int64)
        for row, p in enumerate(prompts):
            ids[row, :len(p)], mask[row, :len(p)] = p, 1
        return ids, mask

    def _check_sources(self, prompts: Sequence[Sequence[int]]) -> None:
        from .errors import InvalidInput

        self._check_batch(prompts, SamplingOptions(max_new_tokens=1))
        longest = max(len(p) for p in prompts)
        if longest > self.max_source:
            raise InvalidInput(
                f"Expected a source of at most {self.max_source} tokens (the encoder's range), found {longest}. "
                f"Shorten it, or rebuild with --shapes sequence=1:{min(longest, self.max_source)}:{longest}."
            )


class _Beams:
    """Beam search state for `rows` sources × `k` beams, step for step as transformers' _beam_search (5.x): the
    2k best continuations of all beams; those ending in a stop token (or at the last step), among the k best,
    compete for the k finished slots (score / generated_length ** length_penalty); the k best others go on. A
    source stops taking finished hypotheses once no live beam can beat its worst finished one (early_stopping
    False: at the current length; "never": at the longest length), or once its slots are full (True)."""

    def __init__(self, rows: int, k: int, penalty: float, early: Any, steps: int, stop: set[int]):
        self.rows, self.k, self.penalty, self.early, self.steps = rows, k, penalty, early, steps
        self.stop = np.array(sorted(stop), np.int64)
        self.running = np.tile(np.array([0.0] + [-1e9] * (k - 1)), (rows, 1))  # only beam 0 of a source is live
        self.seqs = np.zeros((rows * k, 0), np.int64)
        self.fin_scores = np.full((rows, k), -1e9)
        self.fin_seqs: list[list[list[int]]] = [[[] for _ in range(k)] for _ in range(rows)]
        self.fin_flag = np.zeros((rows, k), bool)
        self.open = np.ones(rows, bool)  # transformers' is_early_stop_heuristic_unsatisfied

    def cancel(self, rows: list[int]) -> None:
        self.open[rows] = False

    def step(self, logp: np.ndarray, step: int) -> tuple[np.ndarray, bool]:
        """Advance by one token from the live beams' log-probs [rows × k, vocab]; returns the beam each new
        row continues (to reorder the cache) and whether the search is over."""
        k, vocab = self.k, logp.shape[1]
        acc = (self.running[:, :, None] + logp.reshape(self.rows, k, vocab)).reshape(self.rows, -1)
        top = np.argsort(-acc, axis=1, kind="stable")[:, :2 * k]
        score = np.take_along_axis(acc, top, 1)
        beam, token = top // vocab, top % vocab
        last = step == self.steps - 1
        hits = np.isin(token, self.stop) | last
        live = np.argsort(-(score - 1e9 * hits), axis=1, kind="stable")[:, :k]
        src = np.arange(self.rows)[:, None] * k
        order = (src + np.take_along_axis(beam, live, 1)).reshape(-1)
        new_tokens = np.take_along_axis(token, live, 1).reshape(-1)
        self._finish(score, beam, token, hits, step)
        self.running = np.take_along_axis(score - 1e9 * hits, live, 1)
        self.seqs = np.concatenate([self.seqs[order], new_tokens[:, None]], axis=1)
        self._check_open(step + 1)
        full = self.fin_flag.all() and self.early is True
        return order, bool(last or not self.open.any() or full)

    def _finish(self, score: np.ndarray, beam: np.ndarray, token: np.ndarray, hits: np.ndarray, step: int) -> None:
        k = self.k
        final = score / ((step + 1) ** self.penalty)
        final = final - 1e9 * (self.fin_flag.all(1, keepdims=True) & (self.early is True))
        final = final - 1e9 * ~self.open[:, None]
        just = hits & (np.arange(2 * k) < k)[None, :]
        final = final - 1e9 * ~just
        for row in range(self.rows):
            merged = np.concatenate([self.fin_scores[row], final[row]])
            pick = np.argsort(-merged, kind="stable")[:k]
            seqs, flags = [], []
            for i in pick:
                if i < k:
                    seqs.append(self.fin_seqs[row][i])
                    flags.append(self.fin_flag[row, i])
                else:
                    j = i - k
                    seqs.append([*self.seqs[row * k + beam[row, j]].tolist(), int(token[row, j])])
                    flags.append(bool(just[row, j]))
            self.fin_scores[row], self.fin_seqs[row], self.fin_flag[row] = merged[pick], seqs, flags

    def _check_open(self, generated: int) -> None:
        length = self.steps if self.early == "never" and self.penalty > 0 else generated
        best = self.running[:, 0] / (length ** self.penalty)
        worst = np.where(self.fin_flag, self.fin_scores.min(1, keepdims=True), -1e9)
        self.open &= (best[:, None] > worst).any(1)

    def last(self) -> np.ndarray:
        return self.seqs[:, -1:]

    def best(self, row: int) -> list[int]:
        return [int(t) for t in self.fin_seqs[row][0]]

    def reason(self, row: int, tokens: list[int]) -> str:
        if not self.open[row] and not self.fin_flag[row, 0]:
            return "cancelled"
        return "stop" if tokens and tokens[-1] in set(self.stop.tolist()) else "length"


def _host(value: Any) -> Any:
    """An OrtValue on the GPU as a numpy array (beam search reorders on the host); numpy stays numpy."""
    return value.numpy() if hasattr(value, "numpy") and not isinstance(value, np.ndarray) else value


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = np.max(np.where(np.isfinite(x), x, -np.inf), axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))
