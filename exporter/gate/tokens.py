"""The parity gate of a generation bundle: tokens and per-step logits against transformers' own
generate() in FP32.

Per prompt, two engine runs against one reference run (greedy, no stop token, N new tokens):
- free-running: the engine picks its own tokens; the report gives the first step where they
  differ from transformers' (a divergence where the reference's top two logits are closer than
  the numerical noise is a tie, reported but not failed);
- teacher-forced: the engine is fed the reference's tokens, so its logits at every step see the
  same context as the reference's and are compared with the usual metrics (cosine, rel-L2,
  tie-aware argmax) over all N steps.
A padded batch of all prompts (left-padded; right-padded on ONNX Runtime GenAI) runs once more, free-running, to prove padding changes nothing.
Reduced precisions that cannot show their numerics here (FP16 on ORT's CPU provider) also run
through the storage emulation (exporter/lower/emulate.py), as the single-graph gate does.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from exporter.gate.cases import not_runnable_here
from exporter.gate.parity import OutputMetrics, ParityReport, TolerancePolicy, compare_case
from runtimes.errors import DataError, IncompatibleEngine, MissingDependency
from runtimes.generate import Generator, SamplingOptions, Seq2SeqGenerator, generator_class, load_generator
from runtimes.manifest import DimRange

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived",
)
GATE_TOKENS = 32


def parity_prompts(tokenizer: Any, data: Path | None, config: Any, dims: dict[str, DimRange]) -> list[list[int]]:
    """Token ids of the gate's prompts: --data (a .txt, one prompt a line), else three built-in ones;
    without a tokenizer, random ids below the vocabulary size (seeded)."""
    texts: Sequence[str] = PROMPTS
    if data is not None:
        path = Path(data)
        if not path.is_file() or path.suffix not in (".txt",):
            raise DataError(f"Expected --data for a causal LM as a .txt file with one prompt per line, found '{data}'.")
        texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][:8]
        if not texts:
            raise DataError(f"Expected at least one prompt in '{data}', found an empty file.")
    limit = dims["sequence"].max
    if tokenizer is not None:
        prompts = [list(map(int, tokenizer(t)["input_ids"]))[-limit:] for t in texts]
    else:
        text = getattr(config, "text_config", None) or config
        rng = np.random.default_rng(0)
        prompts = [rng.integers(0, int(text.vocab_size), size=min(n, limit)).tolist() for n in (5, 9, 13)]
    return [p for p in prompts if p]


def gate_tokens(prompts: list[list[int]], max_length: int, options: Any) -> int:
    """New tokens per gate run: GATE_TOKENS, fewer where the engine's max total length leaves less room."""
    return max(1, min(int(getattr(options, "gate_tokens", GATE_TOKENS)), max_length - max(len(p) for p in prompts)))


def calibration_feeds(paths: dict[str, Path], prompts: list[list[int]]) -> dict[str, list[dict[str, np.ndarray]]]:
    """Range data for AutoCast, per graph: the prompts for the prefill; for the decode, the next
    token with the prefill's cache (the FP32 prefill run by ONNX Runtime)."""
    from runtimes._deps import require

    ort = require("onnxruntime", extra="cpu", purpose="Calibration feeds for the decode graph")
    session = ort.InferenceSession(str(paths["prefill"]), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    feeds: dict[str, list[dict[str, np.ndarray]]] = {"prefill": [], "decode": []}
    for p in prompts[:2]:
        ids = np.array([p], np.int64)
        pre = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(len(p))[None]}
        outs = dict(zip(names, session.run(names, pre)))
        feeds["prefill"].append(pre)
        feeds["decode"].append({
            "input_ids": outs["next_token"].astype(np.int64), "attention_mask": np.ones((1, len(p) + 1), np.int64),
            "position_ids": np.array([[len(p)]], np.int64),
            **past_from_present(outs),
        })
    return feeds


def past_from_present(outs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A graph run's present.* outputs named as the next decode step's past_key_values.* inputs."""
    return {n.replace("present", "past_key_values"): v for n, v in outs.items() if n.startswith("present.")}


def reference_generate(model: Any, prompt: Any, steps: int, extra: dict[str, Any] | None = None,
                       config: dict[str, Any] | None = None) -> tuple[list[int], np.ndarray]:
    """transformers' greedy generate() in FP32 for exactly `steps` tokens (prompt: token ids, a speech
    encoder-decoder's features [mels, frames] or a captioning model's pixel_values [3, h, w]): the tokens and each
    step's raw logits [steps, vocab]. No stop token: generate() fills every setting left unset from
    the model's own generation_config (its eos included), so that one is swapped for the call.
    extra: more generate() inputs (a VLM's pixel_values, image_grid_thw, mm_token_type_ids); config: more
    GenerationConfig fields (an encoder-decoder's decoder start, forced first and suppressed tokens: what its
    bundle's loop applies too)."""
    import torch
    from transformers import GenerationConfig

    captions = isinstance(prompt, np.ndarray) and prompt.ndim == 3  # BLIP: its text decoder generates
    target = model.text_decoder if captions else model
    pad = target.generation_config.pad_token_id
    device = next(model.parameters()).device
    saved = target.generation_config
    target.generation_config = GenerationConfig(do_sample=False, max_new_tokens=steps, eos_token_id=None,
                                                pad_token_id=0 if pad is None else pad, output_logits=True,
                                                return_dict_in_generate=True, **(config or {}))
    if captions:
        # BLIP's generate() runs its vision tower, then its text decoder on the image embeddings (what this does)
        # and passes its [SEP] as eos, which would stop the reference before `steps` tokens
        with torch.inference_mode():
            images = model.vision_model(pixel_values=torch.from_numpy(prompt[None]).to(device)).last_hidden_state
        inputs: dict[str, Any] = {"encoder_hidden_states": images,
                                  "encoder_attention_mask": torch.ones(images.shape[:2], dtype=torch.long, device=device)}
        extra = {("input_ids" if k == "decoder_input_ids" else k): v for k, v in (extra or {}).items()}
        run = target.generate
    elif isinstance(prompt, np.ndarray) and prompt.dtype.kind == "f":
        # A speech encoder-decoder's features: transformers' generic generate() (GenerationMixin's; Whisper's own
        # adds language detection, timestamps and long-form decoding, which the bundle does not do), its decoder
        # prompt in `extra` (decoder_input_ids)
        from transformers.generation.utils import GenerationMixin

        inputs = {"input_features": torch.from_numpy(prompt[None]).to(device)}
        run = functools.partial(GenerationMixin.generate, model)
    else:
        ids = torch.tensor([prompt], device=device)
        inputs, run = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, model.generate
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # strict FP32 on a GPU
    try:
        with torch.inference_mode():
            out = run(**inputs, **{k: v.to(device) for k, v in (extra or {}).items()})
    finally:
        target.generation_config = saved
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    # The last `steps` ids: a causal LM's sequences start with the prompt, an encoder-decoder's with its
    # decoder start token.
    tokens = out.sequences[0, -len(out.logits):].tolist()
    logits = torch.stack([s[0] for s in out.logits]).float().cpu().numpy()
    return tokens, logits


def token_metrics(ref: list[int], got: list[int], ref_logits: np.ndarray, forced_logits: np.ndarray | None,
                  required: float | None) -> tuple[OutputMetrics, str]:
    """'tokens': the fraction of steps before the first divergence (1.0: identical), failed below
    `required` unless the divergence is a tie; and a sentence naming the first divergence."""
    n = len(ref)
    m = OutputMetrics("tokens", [len(got)], [n])
    first = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
    if first is None and len(got) != n:
        first = min(len(got), n)
    m.equal = 1.0 if first is None else first / n
    if first is None:
        return m, f"identical for {n} steps"
    if first >= len(got):
        m.failures.append(f"the engine stopped after {len(got)} of {n} tokens")
        return m, f"stopped after {len(got)} of {n} tokens"
    a, b = ref[first], got[first]
    margin = float(ref_logits[first, a] - ref_logits[first, b])
    noise = 3 * float(np.percentile(np.abs(forced_logits[first] - ref_logits[first]), 90)) if forced_logits is not None else 0.0
    tie = margin <= noise
    text = (f"first divergence at step {first} (reference token {a}, engine {b}; reference margin {margin:.3g}"
            f"{' <= noise ' + format(noise, '.3g') + ': a tie' if tie else ''})")
    if required is not None and m.equal < required and not tie:
        m.failures.append(f"tokens agree for {first} of {n} steps ({text})")
    return m, text


def _prefix(prefix: list[int] | None) -> dict[str, Any] | None:
    import torch

    return None if prefix is None else {"decoder_input_ids": torch.tensor([prefix])}


def _torch_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _float_io(path: Path) -> Path:
    """The graph with its BF16 inputs and outputs (a natively exported KV cache) taken and given as
    FP32 holding the same values (casts at the boundary): numpy has no bfloat16, so the emulation
    could not pass the cache from one step to the next. Numerically the same graph."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    low = [v for v in list(g.input) + list(g.output) if v.type.tensor_type.elem_type == TensorProto.BFLOAT16]
    if not low:
        return path
    inputs = {v.name for v in g.input}
    head, tail = [], []
    for v in low:
        if v.name in inputs:
            inner = f"{v.name}__bf16"
            for n in g.node:
                for i, x in enumerate(n.input):
                    if x == v.name:
                        n.input[i] = inner
            head.append(helper.make_node("Cast", [v.name], [inner], to=TensorProto.BFLOAT16, name=f"{inner}_cast"))
        else:
            inner = f"{v.name}__bf16"
            for n in g.node:
                for i, y in enumerate(n.output):
                    if y == v.name:
                        n.output[i] = inner
            tail.append(helper.make_node("Cast", [inner], [v.name], to=TensorProto.FLOAT, name=f"{inner}_cast"))
        v.type.tensor_type.elem_type = TensorProto.FLOAT
    nodes = head + list(g.node) + tail
    del g.node[:]
    g.node.extend(nodes)
    out = path.with_name(path.stem + ".float-io.onnx")
    onnx.save(model, str(out))  # beside the original: the same external data file, if any
    return out


def _gate_runners(bundle: Path, options: Any, lowered: dict[str, Path], report: ParityReport) -> list[tuple[str, Generator]]:
    """(case prefix, generator) pairs: the bundle's engines where they run here, and the storage emulation of
    the lowered graphs for FP16/BF16 that this machine cannot show (notes say which)."""
    from exporter.export.generation import COMPONENTS
    from exporter.lower.emulate import emulated_runner

    runners: list[tuple[str, Generator]] = []
    try:
        runners.append(("", load_generator(bundle, device=options.device, verify=False)))
    except (IncompatibleEngine, MissingDependency) as exc:
        report.notes.append(f"parity not checked: the {options.precision} engines cannot run here "
                            f"({not_runnable_here(exc, options.device, options.precision)}); run the gate on a "
                            "machine with the GPU")
    if options.precision.mixed and lowered and (not runners or not options.device.gpu):
        emulators = {name: emulated_runner(_float_io(lowered[name])) for name in COMPONENTS}
        # enginekit's own loop on the emulated graphs (a GenAI bundle's too: its graphs have the same io)
        loop = Seq2SeqGenerator if generator_class(bundle) is Seq2SeqGenerator else Generator
        runners.append((f"{options.precision}-emulated ", loop(bundle, verify=False,
                                                               session_factory=lambda n: emulators[n])))
        report.notes.append(f"'{options.precision}-emulated' cases run the lowered graphs with FP32 compute and "
                            f"{options.precision} storage on the CPU (what a GPU computes)")
    return runners


def token_gate(model: Any, tokenizer: Any, bundle: Path, prompts: list[list[int]], options: Any,
               lowered: dict[str, Path], say: Any, twin: Path | None = None,
               reference_config: dict[str, Any] | None = None, reference_prefix: list[int] | None = None) -> ParityReport:
    """reference_config: GenerationConfig fields for the reference (reference_generate's config); reference_prefix:
    an encoder-decoder's decoder prompt (Whisper's start and task tokens) given to its generate(); twin: a GenAI model folder whose teacher-forced logits stand in for the bundle's (a PagedAttention
    decoder, which only GenAI's Engine runs and which returns no logits): the same builder, weights and
    precision with GroupQueryAttention; the bundle's own decoder still produces every free-running token."""
    policy = TolerancePolicy.for_precision(options.precision, options.tolerances)
    report = ParityReport(options.precision, policy)
    if options.skip_parity:
        report.notes.append("parity not checked: --skip-parity")
        return report.finish()
    runners = _gate_runners(bundle, options, lowered, report)
    if not runners:
        return report.finish(engine_checked=False)
    twin_gen: Generator | None = None  # teacher-forced logits for the bundle's own ("") runner, when it has a twin
    if twin is not None and runners[0][0] == "":
        from runtimes.genai import GenaiGenerator

        twin_gen = GenaiGenerator(bundle, device=options.device, verify=False, folder=twin)
        report.notes.append("teacher-forced logits: from a GroupQueryAttention twin of the PagedAttention decoder (same "
                            "builder, weights and precision; GenAI's Engine, the only runner of a paged decoder, gives "
                            "no logits); every free-running token comes from the paged decoder itself")
    steps = gate_tokens(prompts, runners[0][1].room(prompts) + max(len(p) for p in prompts), options)
    greedy = SamplingOptions(max_new_tokens=steps, stop_token_ids=[])
    tol = policy.for_output("tokens")
    refs = []
    on_gpu = options.device.gpu and _torch_cuda()
    if on_gpu:  # the FP32 reference on the GPU too (TF32 off): minutes faster for a 1.5B model
        model.to("cuda")
    try:
        for i, prompt in enumerate(prompts):
            say(f"Token parity: reference generate() for prompt {i}" + (" (GPU, FP32)" if on_gpu else ""))
            refs.append(reference_generate(model, prompt, steps, config=reference_config, extra=_prefix(reference_prefix)))
    finally:
        if on_gpu:
            model.to("cpu")
    try:
        for prefix, gen in runners:
            forced_by_prompt = []
            for i, (prompt, (ref_tokens, ref_logits)) in enumerate(zip(prompts, refs)):
                say(f"Token parity: {prefix}engine, prompt {i}")
                free = gen.generate_ids([prompt], greedy)[0].tokens
                teacher = twin_gen if prefix == "" and twin_gen is not None else gen
                forced = teacher.generate_ids([prompt], greedy, record_logits=True, forced=[ref_tokens])[0].logits
                forced_logits = np.stack(forced)
                forced_by_prompt.append(forced_logits)
                case = compare_case(f"{prefix}prompt[{i}] ({len(prompt)} tokens, {steps} steps)",
                                    {"input_ids": np.array([prompt])}, {"logits": ref_logits},
                                    {"logits": forced_logits}, policy)
                metric, text = token_metrics(ref_tokens, free, ref_logits, forced_logits, tol.equal)
                case.outputs.append(metric)
                report.cases.append(case)
                report.notes.append(f"{prefix}prompt[{i}]: {text}")
            if len(prompts) > 1 and gen.max_batch >= len(prompts):
                say(f"Token parity: {prefix}engine, padded batch of {len(prompts)}")
                rows = gen.generate_ids(prompts, greedy)
                worst: tuple[OutputMetrics, str] | None = None
                for row, (ref_tokens, ref_logits), forced_logits in zip(rows, refs, forced_by_prompt):
                    metric, text = token_metrics(ref_tokens, row.tokens, ref_logits, forced_logits, tol.equal)
                    if worst is None or metric.equal < worst[0].equal:
                        worst = (metric, text)
                assert worst is not None
                report.cases.append(compare_case(f"{prefix}batch of {len(prompts)} (padded)",
                                                 {"input_ids": np.zeros((len(prompts), 1), np.int64)}, {}, {}, policy))
                report.cases[-1].outputs.append(worst[0])
                report.notes.append(f"{prefix}batch: worst row {worst[1]}")
    finally:
        for gen in [g for _, g in runners] + ([twin_gen] if twin_gen is not None else []):
            gen.close()
    engine_ran = any(prefix == "" for prefix, _ in runners)
    return report.finish(engine_checked=engine_ran)
