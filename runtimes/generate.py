"""Text generation from a generation bundle, without torch:

    from runtimes.generate import SamplingOptions, load_generator
    with load_generator("engines/smollm2-ort-fp32") as g:
        print(g.generate("The capital of France is", SamplingOptions(max_new_tokens=32)).text)

`load_generator` opens a causal LM's bundle on ONNX Runtime GenAI (runtimes/genai.py) when its builder
wrote it, else as the decoding loop of runtimes/decoding.py, a VLM's as runtimes/vlm.py's
VisionLanguageGenerator (whose generate() also takes images=[...]), and an encoder-decoder's as
runtimes/seq2seq.py's Seq2SeqGenerator (greedy, sampling and beam search).
"""

from __future__ import annotations

from pathlib import Path

from .choices import Kind
from .decoding import (
    GENERATION_FILE,
    TOKENIZER_FILE,
    Generation,
    Generator,
    SamplingOptions,
    Tokenizer,
    sample_next,
)
from .genai import RUNTIME as GENAI_RUNTIME
from .genai import GenaiGenerator
from .manifest import Manifest
from .seq2seq import SEQ2SEQ, Seq2SeqGenerator
from .vlm import VisionLanguageGenerator

__all__ = ["GENERATION_FILE", "TOKENIZER_FILE", "Generation", "Generator", "SamplingOptions", "Seq2SeqGenerator",
           "Tokenizer", "VisionLanguageGenerator", "generator_class", "load_generator", "sample_next"]


def load_generator(bundle: str | Path, *, device: str | None = None, threads: int | None = None,
                   verify: bool = True, cuda_graph: bool | None = None) -> Generator:
    """Open a generation bundle: one ONNX Runtime GenAI runs (the manifest's target.options.generator) as a
    runtimes.genai.GenaiGenerator, a VLM bundle (generation.json names a vision engine) as a
    VisionLanguageGenerator, others as enginekit's own loop (runtimes.decoding.Generator). cuda_graph: capture
    the decode step (None: each loop's default, on where it can be on CUDA; True where it cannot: UsageError)."""
    return generator_class(bundle)(bundle, device=device, threads=threads, verify=verify, cuda_graph=cuda_graph)


def generator_class(bundle: str | Path) -> type[Generator]:
    """The loop that runs a generation bundle, from its manifest alone (generation.json is read once checked)."""
    manifest = Manifest.read(bundle)
    if manifest.kind is Kind.VISION_LANGUAGE:
        return VisionLanguageGenerator
    if manifest.target.options.get("generator") == GENAI_RUNTIME:
        return GenaiGenerator
    if manifest.target.options.get("architecture") == SEQ2SEQ:
        return Seq2SeqGenerator
    return Generator
