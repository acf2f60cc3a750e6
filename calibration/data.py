"""Data sources for the parity gate and calibration, each yielding plain feed dicts.

- `.npz` file: one feed dict (array names = input names); a folder of .npz files: one per file.
- `.txt` (one text a line) or `.jsonl` (objects with a "text" field): tokenized with the model's
  tokenizer (the hf: folder), padded per batch, truncated to the engine's max sequence length.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from runtimes.errors import DataError
from runtimes.manifest import IOSpec

TEXT_SUFFIXES = (".txt", ".jsonl")


def load_feeds(
    path: str | Path,
    io: IOSpec,
    *,
    tokenizer_dir: str | Path | None = None,
    batch_size: int = 8,
    max_samples: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """Feed dicts from `path` that fit `io` (names and dtypes); DataError when they cannot."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"Expected a data file or folder at '{path}', found nothing. Check the --data path.")
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise DataError(
                f"Expected .npz feed files in folder '{path}', found none"
                f" (it holds {len(list(path.iterdir()))} other entries). Save each feed dict with "
                "numpy.savez(file, input_name=array, ...)."
            )
        feeds = [_load_npz(f, io) for f in files[:max_samples]]
    elif path.suffix == ".npz":
        feeds = [_load_npz(path, io)]
    elif path.suffix in TEXT_SUFFIXES:
        texts = read_texts(path)[:max_samples]
        feeds = list(tokenize(texts, io, tokenizer_dir, batch_size=batch_size, source=path))
    else:
        raise DataError(
            f"Expected --data to be a .npz file, a folder of .npz files, or a .txt/.jsonl text file, found "
            f"'{path.name}'."
        )
    return feeds


def _load_npz(path: Path, io: IOSpec) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # zipfile/BadZipFile/ValueError on corrupt files
        raise DataError(f"Expected '{path}' to be a numpy .npz archive, but it cannot be read ({exc}).") from None
    names = [s.name for s in io.inputs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise DataError(
            f"Expected arrays named {names} in '{path}', found {sorted(arrays)} (missing {missing}). Name each "
            "array after the engine input it feeds."
        )
    out = {}
    for spec in io.inputs:
        arr = arrays[spec.name]
        if arr.dtype.name != spec.dtype:
            if np.can_cast(arr.dtype, spec.dtype, casting="same_kind"):
                arr = arr.astype(spec.dtype)
            else:
                raise DataError(f"Expected '{spec.name}' in '{path}' as {spec.dtype}, found {arr.dtype}.")
        out[spec.name] = np.ascontiguousarray(arr)
    return out


def read_texts(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"Expected one JSON object per line in '{path}', line {i} is not JSON ({exc}).") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(f"Expected a \"text\" string field on line {i} of '{path}', found {str(obj)[:80]}.")
            texts.append(obj["text"])
    else:
        texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise DataError(f"Expected at least one text in '{path}', found none.")
    return texts


def tokenize(texts: list[str], io: IOSpec, tokenizer_dir: str | Path | None, *, batch_size: int, source: Path) -> Iterator[dict[str, np.ndarray]]:
    if tokenizer_dir is None:
        raise DataError(
            f"Expected a tokenizer to turn the texts of '{source}' into token ids, but the model source has none "
            "(an hf: folder with tokenizer files). Pass token ids as .npz instead."
        )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    seq_dim = next((d for s in io.inputs if s.name == "input_ids" for d in s.shape[1:2] if isinstance(d, str)), None)
    max_len = io.dims[seq_dim].max if seq_dim in io.dims else None
    names = {s.name: s for s in io.inputs}
    for start in range(0, len(texts), batch_size):
        enc: Any = tok(texts[start:start + batch_size], padding=True, truncation=max_len is not None,
                       max_length=max_len, return_tensors="np")
        feed = {k: np.ascontiguousarray(np.asarray(v).astype(names[k].dtype)) for k, v in enc.items() if k in names}
        if "token_type_ids" in names and "token_type_ids" not in feed and "input_ids" in feed:
            feed["token_type_ids"] = np.zeros_like(feed["input_ids"])  # single-segment text
        missing = [n for n in names if n not in feed]
        if missing:
            raise DataError(f"Expected the tokenizer of '{tokenizer_dir}' to produce {sorted(names)}, it gave {sorted(enc)}.")
        yield feed
