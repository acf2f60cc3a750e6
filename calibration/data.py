"""Data sources for the parity gate and calibration, each yielding plain feed dicts.

- `.npz` file: one feed dict (array names = input names); a folder of .npz files: one per file.
- `.txt` (one text a line) or `.jsonl` (objects with a "text" field): tokenized with the model's
  tokenizer (the hf: folder), padded per batch, truncated to the engine's max sequence length
  (with a warning naming how many texts were cut).
- a folder of images (.jpg, .png, ...): preprocessed per the model's image processor config, or
  explicit --resize/--mean/--std (calibration/images.py).
- a .wav file or a folder of them (speech models): resampled and normalized per the model's feature
  extractor config, padded per batch with an attention mask (calibration/audio.py).
- `random` or `random:N`: N generated samples (default 32). Only for smoke tests: ranges from random
  inputs are not the ranges real data produces, and a loud warning says so.

`load_split` holds samples out for evaluation *before* batching (every 4th sample), so accuracy
is never measured on the data the ranges came from.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtimes.base import value_problems
from runtimes.errors import DataError
from runtimes.manifest import IOSpec

from .audio import AUDIO_SUFFIXES, FeatureConfig, audio_files, batch_clips, is_audio_io, load_clips
from .images import ImageOptions, image_files, load_images, pixel_input, preprocessing

TEXT_SUFFIXES = (".txt", ".jsonl")
EVAL_EVERY = 4  # every 4th sample is held out for evaluation
RANDOM_SAMPLES = 32
Feeds = dict[str, np.ndarray]


class DataWarning(UserWarning):
    """Data was used, but not as given (texts truncated, images skipped, random data)."""


@dataclass
class DataSplit:
    """Calibration and held-out evaluation feeds, with what they came from."""

    calibration: list[Feeds]
    evaluation: list[Feeds]
    source: str
    kind: str  # "text" | "images" | "audio" | "npz" | "random"
    samples: tuple[int, int]  # (calibration, evaluation) samples before batching
    notes: list[str] = field(default_factory=list)
    preprocessing: dict[str, Any] | None = None

    @property
    def sha256(self) -> str:
        """Digest of the calibration feeds themselves (names, dtypes, shapes, bytes): it changes when
        the data, its preprocessing, the split or the tokenizer changes."""
        return feeds_sha256(self.calibration)


def feeds_sha256(feeds: Sequence[Feeds]) -> str:
    h = hashlib.sha256()
    for feed in feeds:
        for name in sorted(feed):
            arr = np.ascontiguousarray(feed[name])
            h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
            h.update(arr.tobytes())
    return h.hexdigest()


def _warn(notes: list[str], message: str) -> None:
    notes.append(message)
    warnings.warn(message, DataWarning, stacklevel=3)


def load_feeds(
    path: str | Path,
    io: IOSpec,
    *,
    tokenizer_dir: str | Path | None = None,
    batch_size: int = 8,
    max_samples: int | None = None,
    image_options: ImageOptions | None = None,
) -> list[Feeds]:
    """Feed dicts from `path` that fit `io` (names and dtypes); DataError when they cannot."""
    kind, items, source = _items(path, io, max_samples)
    notes: list[str] = []
    opts = image_options or ImageOptions()
    kind, items, _ = _decoded(kind, items, io, source, tokenizer_dir, opts, notes)
    feeds = _to_feeds(kind, items, io, source, tokenizer_dir, batch_size, notes)
    check_fits(feeds, io, str(source))
    return feeds


def load_split(
    path: str | Path,
    io: IOSpec,
    *,
    eval_data: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
    batch_size: int = 8,
    max_samples: int | None = 512,
    image_options: ImageOptions | None = None,
    seed: int = 0,
) -> DataSplit:
    """Calibration feeds from `path` and evaluation feeds held out from it (every 4th sample), or
    taken from `eval_data` when given (then all of `path` calibrates)."""
    opts = image_options or ImageOptions()
    notes: list[str] = []
    batch_size, fixed = _fit_batch(io, batch_size)
    if str(path).startswith("random"):
        return _random_split(str(path), io, notes, seed)
    kind, items, source = _items(path, io, max_samples)
    kind, items, pre = _decoded(kind, items, io, source, tokenizer_dir, opts, notes)
    if eval_data is not None:
        ekind, eitems, esource = _items(eval_data, io, max_samples)
        ekind, eitems, _ = _decoded(ekind, eitems, io, esource, tokenizer_dir, opts, notes)
        cal_items, eval_items = items, eitems
    else:
        ekind, esource = kind, source
        if len(items) < 2:
            raise DataError(
                f"Expected at least 2 samples in '{source}' to hold one out for evaluation, found {len(items)}. "
                "Add samples, or pass separate evaluation data (--data)."
            )
        held = [i for i in range(len(items)) if i % EVAL_EVERY == EVAL_EVERY - 1] or [len(items) - 1]
        cal_items = [x for i, x in enumerate(items) if i not in set(held)]
        eval_items = [items[i] for i in held]
    cal = _to_feeds(kind, cal_items, io, source, tokenizer_dir, batch_size, notes)
    ev = _to_feeds(ekind, eval_items, io, esource, tokenizer_dir, batch_size, notes)
    if fixed:  # a static batch dim: a short last batch cannot run
        cal, ev = ([f for f in feeds if _rows(f) == batch_size] or feeds for feeds in (cal, ev))
    described = pre.get("kind", "images") if pre is not None else "npz" if kind == "rows" else kind
    return DataSplit(cal, ev, str(source), described, (len(cal_items), len(eval_items)), notes, pre)




def _random_split(spec: str, io: IOSpec, notes: list[str], seed: int) -> DataSplit:
    from runtimes.samples import generate_feeds

    _, _, count = spec.partition(":")
    try:
        n = int(count) if count else RANDOM_SAMPLES
    except ValueError:
        raise DataError(f"Expected 'random' or 'random:N' (N samples), found '{spec}'.") from None
    batches = max(2, n // max(1, _opt_batch(io)))
    held = max(1, batches // EVAL_EVERY)
    _warn(notes, f"CALIBRATING ON RANDOM DATA ('{spec}'): for smoke tests only. Ranges from random inputs are not "
                 "the ranges real data produces; the accuracy measured here says nothing about real inputs. "
                 "Pass real samples with --calib.")
    cal = [generate_feeds(io, "opt", seed=seed + 1000 + i) for i in range(batches - held)]
    ev = [generate_feeds(io, "opt", seed=seed + 5000 + i) for i in range(held)]
    per = _opt_batch(io)
    return DataSplit(cal, ev, spec, "random", (len(cal) * per, len(ev) * per), notes)


def _rows(feed: Feeds) -> int:
    return int(next(iter(feed.values())).shape[0]) if feed else 0


def _fit_batch(io: IOSpec, wanted: int) -> tuple[int, bool]:
    """(batch size to use, whether it is fixed): at most the batch dim's max, or its static size."""
    first = next((s.shape[0] for s in io.inputs if s.shape), None)
    if isinstance(first, int):
        return first, True
    if first in io.dims:
        return max(1, min(wanted, io.dims[first].max)), False
    return wanted, False


def _opt_batch(io: IOSpec) -> int:
    dim = next((d for s in io.inputs for d in s.shape[:1] if isinstance(d, str)), None)
    return io.dims[dim].opt if dim in io.dims else 1


def _items(path: str | Path, io: IOSpec, max_samples: int | None) -> tuple[str, list[Any], Path]:
    """(kind, samples, path): texts, image files, npz feed dicts, or rows of one npz."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"Expected a data file or folder at '{path}', found nothing. Check the --data/--calib path.")
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if files:
            return "npz", [_load_npz(f, io) for f in files[:max_samples]], path
        images = image_files(path)
        if images:
            return "images", images[:max_samples], path
        recordings = audio_files(path)
        if recordings:
            return "audio", recordings[:max_samples], path
        entries = sorted(p.name for p in path.iterdir())
        raise DataError(
            f"Expected .npz feed files, images or .wav recordings in folder '{path}', found none"
            + (f" (it holds {len(entries)} other entries: {', '.join(entries[:5])})" if entries else " (it is empty)")
            + ". Save each feed dict with numpy.savez(file, input_name=array, ...), or put .jpg/.png images or .wav "
            "files there."
        )
    if path.suffix == ".npz":
        feed = _load_npz(path, io)
        firsts = {v.shape[0] if v.ndim else -1 for v in feed.values()}
        if len(firsts) != 1 or -1 in firsts:
            return "npz", [feed], path  # no shared batch axis: one sample
        rows = [{k: v[i:i + 1] for k, v in feed.items()} for i in range(firsts.pop())]
        return "rows", rows[:max_samples], path
    if path.suffix in TEXT_SUFFIXES:
        return "text", read_texts(path)[:max_samples], path
    if path.suffix.lower() in AUDIO_SUFFIXES:
        return "audio", [path], path
    raise DataError(
        f"Expected data as a .npz file, a folder of .npz files or images, a .txt/.jsonl text file, or "
        f"'random[:N]', found '{path.name}'."
    )


def _decoded(kind: str, items: list[Any], io: IOSpec, source: Path, tokenizer_dir: str | Path | None,
             opts: ImageOptions, notes: list[str]) -> tuple[str, list[Any], dict[str, Any] | None]:
    """Image files → preprocessed {input: CHW array} samples, decoded all at once so that broken
    files are counted over the whole folder; .wav files → model-ready waveforms (calibration/audio.py);
    other kinds pass through."""
    if kind == "audio":
        if not is_audio_io(io):
            raise DataError(f"Expected data for the inputs {[s.name for s in io.inputs]}, found .wav recordings in "
                            f"'{source}': only speech models (input_values) take audio. Pass data of this model's kind.")
        folder = Path(tokenizer_dir) if tokenizer_dir else None
        cfg = FeatureConfig.of(folder)
        clips, said = load_clips(items, io, folder)
        for message in said:
            _warn(notes, message)
        return "clips", clips, {"kind": "audio", "sampling_rate": cfg.sampling_rate, "do_normalize": cfg.do_normalize}
    if kind != "images":
        return kind, items, None
    spec = pixel_input(io, source)
    pre = preprocessing(spec, opts, Path(tokenizer_dir) if tokenizer_dir else None)
    arrays, bad = load_images(items, spec, pre, opts, source)
    if bad:
        _warn(notes, f"skipped {len(bad)} of {len(items)} images in '{source}' that fail to decode: "
                     f"{', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}")
    return "rows", [{spec.name: a[None].astype(spec.dtype)} for a in arrays], pre.describe()


def _to_feeds(kind: str, items: list[Any], io: IOSpec, source: Path, tokenizer_dir: str | Path | None,
              batch_size: int, notes: list[str]) -> list[Feeds]:
    if kind == "text":
        return list(tokenize(items, io, tokenizer_dir, batch_size=batch_size, source=source, notes=notes))
    if kind == "clips":  # waveforms of different lengths: padded per batch
        return batch_clips(items, io, batch_size, Path(tokenizer_dir) if tokenizer_dir else None)
    if kind == "rows":  # single samples (images, rows of one .npz), batched after the split
        return [{k: np.ascontiguousarray(np.concatenate([r[k] for r in items[i:i + batch_size]])) for k in items[0]}
                for i in range(0, len(items), batch_size)]
    return list(items)


def _load_npz(path: Path, io: IOSpec) -> Feeds:
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


def check_fits(feeds: Sequence[Feeds], io: IOSpec, source: str) -> None:
    """DataError listing every feed whose ranks or static dims do not fit the model's inputs, or
    whose dynamic dims fall outside the recorded ranges, before anything runs on them."""
    problems = []
    for i, feed in enumerate(feeds):
        for spec in io.inputs:
            arr = feed.get(spec.name)
            if arr is None:
                problems.append(f"batch {i} lacks '{spec.name}'")
                continue
            if arr.ndim != len(spec.shape):
                problems.append(f"batch {i} '{spec.name}' has shape {list(arr.shape)}, expected rank {len(spec.shape)}")
                continue
            for axis, (size, want) in enumerate(zip(arr.shape, spec.shape)):
                rng = io.dims.get(want) if isinstance(want, str) else None
                if (isinstance(want, int) and size != want) or (rng is not None and not rng.min <= size <= rng.max):
                    allowed = str(want) if isinstance(want, int) else f"{want}={rng.min}..{rng.max}" if rng else want
                    problems.append(f"batch {i} '{spec.name}' axis {axis} is {size}, expected {allowed}")
        problems += [f"batch {i} {p}" for p in value_problems(feed, io.values)]
    if problems:
        expected = "; ".join(s.describe() for s in io.inputs)
        raise DataError(
            f"Expected data from '{source}' to fit the model's inputs ({expected}), but "
            f"{'; '.join(problems[:6])}{f'; and {len(problems) - 6} more' if len(problems) > 6 else ''}. Fix the data "
            "(or its batch size), or rebuild with wider ranges (--shapes); nothing was written."
        )


def read_texts(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(
            f"Expected '{path}' to be UTF-8 text (one text per line), but byte {exc.start} is not valid UTF-8 "
            f"({exc.reason}). Convert it, e.g. `iconv -f LATIN1 -t UTF-8 {path} > fixed{path.suffix}`, and pass that."
        ) from None
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


def tokenize(texts: list[str], io: IOSpec, tokenizer_dir: str | Path | None, *, batch_size: int, source: Path,
             notes: list[str] | None = None) -> Iterator[Feeds]:
    if tokenizer_dir is None:
        raise DataError(
            f"Expected a tokenizer to turn the texts of '{source}' into token ids, but the model source has none "
            "(an hf: folder with tokenizer files). Pass token ids as .npz instead."
        )
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except (OSError, ValueError, KeyError) as exc:  # a folder without tokenizer files
        raise DataError(
            f"Expected a tokenizer in '{tokenizer_dir}' to turn the texts of '{source}' into token ids, but none "
            f"loads ({str(exc).strip().splitlines()[0][:200]}). Pass token ids as .npz instead."
        ) from None
    seq_dim = next((d for s in io.inputs if s.name == "input_ids" for d in s.shape[1:2] if isinstance(d, str)), None)
    max_len = io.dims[seq_dim].max if seq_dim in io.dims else None
    if max_len is not None:
        lengths = [len(ids) for ids in tok(texts, truncation=False)["input_ids"]]
        cut = [i for i, n in enumerate(lengths) if n > max_len]
        if cut:
            _warn(notes if notes is not None else [],
                  f"truncated {len(cut)} of {len(texts)} texts in '{source}' to the engine's max sequence of {max_len} "
                  f"tokens (longest: {max(lengths)} tokens; first at line {cut[0] + 1}). Rebuild with "
                  f"--shapes {seq_dim}=1:{min(128, max_len)}:{max(lengths)} to keep them whole.")
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
