"""A folder of images → pixel feeds, preprocessed the way the model was trained.

Preprocessing comes from the Hugging Face image processor config (`preprocessor_config.json` in the
hf: folder) when there is one: resize (shortest edge, or height × width), center crop, rescale,
normalize. Otherwise it must be given (`--mean`, `--std`, optionally `--resize`): a classifier fed
pixels normalized with the wrong statistics calibrates ranges it will never see in service, and no
default is right for every model. Decoding uses Pillow; an image that fails to decode is skipped
and counted, and too many failures stop the run (a folder of mostly broken files is a broken
data set, not a calibration set).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtimes.errors import DataError
from runtimes.manifest import IOSpec, TensorSpec

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")
PROCESSOR_CONFIG = "preprocessor_config.json"
# Pillow resample codes as stored in HF configs (2 = bilinear, 3 = bicubic).
_BILINEAR = 2


@dataclass(frozen=True)
class ImageOptions:
    """Explicit preprocessing for images (used when the model has no preprocessor_config.json).

    resize: shortest edge in pixels before the center crop (default: the model's input size, i.e.
    no margin). mean/std: per-channel normalization of pixels rescaled to [0, 1]; required without a
    processor config. max_bad_fraction: share of undecodable files tolerated (default 0.1)."""

    resize: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    max_bad_fraction: float = 0.1


@dataclass(frozen=True)
class Preprocess:
    size: dict[str, int]  # {"shortest_edge": n} or {"height": h, "width": w}
    crop: tuple[int, int] | None  # (h, w) center crop, None when the resize already gives the input size
    rescale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resample: int
    source: str  # where these settings came from, for the manifest

    def describe(self) -> dict[str, Any]:
        return {"size": self.size, "crop": list(self.crop) if self.crop else None, "rescale": self.rescale,
                "mean": list(self.mean), "std": list(self.std), "from": self.source}


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def pixel_input(io: IOSpec, source: Path) -> TensorSpec:
    """The one float NCHW input images feed; DataError when the model needs other inputs too."""
    pixels = [s for s in io.inputs if s.dtype.startswith("float") and len(s.shape) == 4]
    others = [s.name for s in io.inputs if s not in pixels]
    if len(pixels) != 1 or others:
        raise DataError(
            f"Expected a model with a single image input (float, [batch, channels, height, width]) for the "
            f"images in '{source}', found inputs {[s.describe() for s in io.inputs]}. Images alone cannot feed "
            "it: save complete feed dicts as .npz files (numpy.savez(file, input_name=array, ...)) instead."
        )
    return pixels[0]


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, dict):
        return int(value["height"]), int(value["width"])
    return int(value), int(value)


def preprocessing(spec: TensorSpec, options: ImageOptions, processor_dir: Path | None) -> Preprocess:
    """Settings from `processor_dir/preprocessor_config.json`, else from `options`."""
    hw = tuple(d for d in spec.shape[2:])
    fixed = tuple(int(d) for d in hw) if all(isinstance(d, int) for d in hw) else None
    config_path = Path(processor_dir) / PROCESSOR_CONFIG if processor_dir else None
    if config_path is not None and config_path.is_file() and options.mean is None:
        try:
            cfg = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"Expected JSON in '{config_path}', but it cannot be parsed ({exc}).") from None
        size = cfg.get("size") or {"shortest_edge": fixed[0] if fixed else 224}
        if isinstance(size, int):
            size = {"shortest_edge": size}
        crop = _pair(cfg["crop_size"]) if cfg.get("do_center_crop") and cfg.get("crop_size") else None
        if "shortest_edge" in size and cfg.get("crop_pct") and crop is None:
            # ConvNeXt-style: resize to edge / crop_pct, then crop the edge.
            edge = int(size["shortest_edge"])
            size, crop = {"shortest_edge": int(edge / float(cfg["crop_pct"]))}, (edge, edge)
        if crop is None and "shortest_edge" in size:
            crop = fixed or (int(size["shortest_edge"]),) * 2
        normalize = cfg.get("do_normalize", True)
        return Preprocess(
            size={k: int(v) for k, v in size.items() if k in ("shortest_edge", "height", "width")},
            crop=crop,
            rescale=float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0,
            mean=tuple(cfg.get("image_mean", [0.0] * 3)) if normalize else (0.0, 0.0, 0.0),
            std=tuple(cfg.get("image_std", [1.0] * 3)) if normalize else (1.0, 1.0, 1.0),
            resample=int(cfg.get("resample", _BILINEAR)),
            source=str(config_path),
        )
    if options.mean is None or options.std is None:
        where = f" (no {PROCESSOR_CONFIG} in '{processor_dir}')" if processor_dir else ""
        raise DataError(
            f"Expected image preprocessing for input '{spec.name}': a {PROCESSOR_CONFIG} in the hf: model folder, "
            f"or --mean and --std{where}, found neither. Give the normalization the model was trained with, e.g. "
            "--mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 (ImageNet) [--resize 256]."
        )
    if fixed is None:
        raise DataError(
            f"Expected fixed height and width on the image input {spec.describe()} to size the images, found "
            "dynamic dims. Export with a fixed image size."
        )
    channels = spec.shape[1] if isinstance(spec.shape[1], int) else 3
    for name, values in (("mean", options.mean), ("std", options.std)):
        if len(values) not in (1, channels):
            raise DataError(f"Expected --{name} with 1 or {channels} values, found {len(values)}: {list(values)}.")
    if any(s == 0 for s in options.std):
        raise DataError(f"Expected non-zero --std values, found {list(options.std)}.")
    return Preprocess(size={"shortest_edge": options.resize or min(fixed)}, crop=fixed, rescale=1 / 255,
                      mean=tuple(options.mean), std=tuple(options.std), resample=_BILINEAR, source="explicit options")


def _load_one(path: Path, pre: Preprocess, channels: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        if "shortest_edge" in pre.size:
            edge = pre.size["shortest_edge"]
            w, h = img.size
            scale = edge / min(w, h)
            img = img.resize((max(edge, round(w * scale)), max(edge, round(h * scale))), resample=pre.resample)
        else:
            img = img.resize((pre.size["width"], pre.size["height"]), resample=pre.resample)
        if pre.crop is not None:
            ch, cw = pre.crop
            w, h = img.size
            left, top = (w - cw) // 2, (h - ch) // 2
            img = img.crop((left, top, left + cw, top + ch))
        arr = np.asarray(img, dtype=np.float32)
    arr = arr[..., None] if arr.ndim == 2 else arr
    arr = (arr * pre.rescale - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def load_images(files: list[Path], spec: TensorSpec, pre: Preprocess, options: ImageOptions,
                source: Path) -> tuple[list[np.ndarray], list[str]]:
    """Preprocessed CHW arrays of `files` (undecodable ones skipped) and the names skipped."""
    channels = spec.shape[1] if isinstance(spec.shape[1], int) else 3
    arrays, bad = [], []
    for f in files:
        try:
            arrays.append(_load_one(f, pre, channels))
        except (OSError, ValueError, SyntaxError):  # Pillow's UnidentifiedImageError is an OSError
            bad.append(f.name)
    if bad and (len(bad) > options.max_bad_fraction * len(files) or not arrays):
        raise DataError(
            f"Expected decodable images in '{source}', but {len(bad)} of {len(files)} fail to decode "
            f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}), more than the {options.max_bad_fraction:.0%} "
            "tolerated. Remove or re-encode the broken files; nothing was written."
        )
    want = tuple(d for d in spec.shape[1:])
    if arrays and all(isinstance(d, int) for d in want) and arrays[0].shape != want:
        raise DataError(
            f"Expected images preprocessed to {list(want)} for input '{spec.name}', found {list(arrays[0].shape)} "
            f"with the settings {pre.describe()}. Fix the crop size (preprocessor config or --resize) to the "
            "model's input size."
        )
    return arrays, bad
