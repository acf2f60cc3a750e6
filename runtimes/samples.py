"""Sample inputs from an IOSpec (numpy only): export tracing, the parity gate, bench and warm-up.

Each input may carry a value hint in `IOSpec.values` (recorded in the manifest), so a bundle alone
is enough to make valid inputs: token ids below the vocabulary size, 0/1 attention masks with
padding, pixels from a normal distribution. Inputs are random, never all zeros: zeros hide errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import UsageError
from .manifest import IOSpec, ShapePoint, TensorSpec

SHAPE_POINTS: tuple[ShapePoint, ...] = ("min", "opt", "max")


def value_hint_for(spec: TensorSpec, hints: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The recorded hint, or a default by dtype (floats ~ N(0,1), ints in [0, 2), bools random)."""
    if spec.name in hints:
        return dict(hints[spec.name])
    if spec.dtype.startswith(("float", "bfloat")):
        return {"kind": "normal", "std": 1.0}
    if spec.dtype == "bool":
        return {"kind": "bool"}
    if "mask" in spec.name:
        return {"kind": "mask"}
    return {"kind": "randint", "low": 0, "high": 2}


def sample_array(spec: TensorSpec, shape: tuple[int, ...], hint: Mapping[str, Any], rng: np.random.Generator) -> np.ndarray:
    kind = hint.get("kind", "normal")
    dtype = np.dtype(spec.dtype) if spec.dtype != "bfloat16" else np.dtype("float32")
    if kind == "normal":
        arr = rng.normal(float(hint.get("mean", 0.0)), float(hint.get("std", 1.0)), size=shape)
    elif kind == "uniform":
        arr = rng.uniform(float(hint.get("low", 0.0)), float(hint.get("high", 1.0)), size=shape)
    elif kind == "randint":
        arr = rng.integers(int(hint.get("low", 0)), max(int(hint.get("high", 2)), int(hint.get("low", 0)) + 1), size=shape)
    elif kind == "zeros":
        arr = np.zeros(shape)
    elif kind == "ones":  # a generation graph's attention mask: every position attends
        arr = np.ones(shape)
    elif kind == "bool":
        arr = rng.random(size=shape) < 0.5
    elif kind == "mask":
        # Row 0 attends everywhere; other rows are right-padded to a random length, as a padded
        # batch of real sentences would be.
        arr = np.ones(shape)
        if len(shape) == 2 and shape[0] > 1 and shape[1] > 1:
            for row in range(1, shape[0]):
                arr[row, rng.integers(max(1, shape[1] // 2), shape[1] + 1):] = 0
    else:
        raise UsageError(f"Unknown input value kind '{kind}' for '{spec.name}'.")
    return np.ascontiguousarray(arr.astype(dtype))


def generate_feeds(
    io: IOSpec,
    point: ShapePoint | Mapping[str, int] = "opt",
    *,
    hints: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """One feed dict with every dynamic dim at `point` ('min'/'opt'/'max' or explicit sizes).

    hints: value hints per input (default: the ones recorded in `io.values`).
    """
    rng = np.random.default_rng(seed)
    sizes = {name: (rng_.at(point) if isinstance(point, str) else int(point[name])) for name, rng_ in io.dims.items()}
    feeds = {}
    for spec in io.inputs:
        shape = tuple(d if isinstance(d, int) else sizes[d] for d in spec.shape)
        feeds[spec.name] = sample_array(spec, shape, value_hint_for(spec, io.values if hints is None else hints), rng)
    return feeds
