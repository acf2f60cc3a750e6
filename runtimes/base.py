"""The one Runner shape every backend implements.

    with runtimes.load(bundle) as r:
        outputs = r.infer({"input_ids": ids, "attention_mask": mask})

The base class validates names, dtypes, ranks and shapes (including each dynamic dim's recorded
range, and that a dim shared by several inputs has one value) before a backend sees them, and
reports every problem in one message.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InvalidInput
from .manifest import DimRange, Manifest, TensorSpec


class _Prepared:
    def __init__(self, feeds: dict[str, np.ndarray]):
        self.feeds = feeds
        self.outputs: dict[str, np.ndarray] = {}

    def fetch(self) -> dict[str, np.ndarray]:
        return self.outputs


class Runner(ABC):
    def __init__(self, bundle: Path, manifest: Manifest):
        self.bundle = Path(bundle)
        self.manifest = manifest

    # -- what the engine takes and gives ---------------------------------------------------------
    def input_specs(self) -> list[TensorSpec]:
        return list(self.manifest.io.inputs)

    def output_specs(self) -> list[TensorSpec]:
        return list(self.manifest.io.outputs)

    @property
    def dims(self) -> dict[str, DimRange]:
        return dict(self.manifest.io.dims)

    # -- running -----------------------------------------------------------------------------------
    def infer(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Validate `feeds` against the manifest and run the engine; outputs as numpy arrays."""
        return self._infer(self.validate(feeds))

    @abstractmethod
    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def prepare(self, feeds: Mapping[str, Any]) -> Any:
        """Validate `feeds` once and place them where the engine reads them; `run_prepared` then runs
        without re-validating or copying (the bench's timed loop). Backends with device buffers
        override this; the default keeps the validated host arrays."""
        return _Prepared(self.validate(feeds))

    def run_prepared(self, prepared: Any) -> None:
        """One inference on prepared inputs (results: prepared.fetch())."""
        prepared.outputs = self._infer(prepared.feeds)

    def close(self) -> None:  # noqa: B027 - backends with resources override it
        """Release the engine's resources; the runner is unusable afterwards."""

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- validation ----------------------------------------------------------------------------------
    def validate(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        specs = {s.name: s for s in self.input_specs()}
        if not isinstance(feeds, Mapping):
            raise InvalidInput(
                f"Expected a dict of input name -> array for {sorted(specs)}, found {type(feeds).__name__}. "
                "Pass e.g. runner.infer({'" + next(iter(specs), "x") + "': array})."
            )
        problems: list[str] = []
        missing = [n for n in specs if n not in feeds]
        unexpected = [n for n in feeds if n not in specs]
        if missing:
            problems.append(f"missing input(s) {missing}")
        if unexpected:
            problems.append(f"unexpected input(s) {unexpected}")
        arrays: dict[str, np.ndarray] = {}
        seen_dims: dict[str, tuple[int, str]] = {}
        for name, spec in specs.items():
            if name not in feeds:
                continue
            arr = np.asarray(feeds[name])
            arrays[name] = arr
            if arr.dtype.name != spec.dtype:
                problems.append(f"'{name}' has dtype {arr.dtype.name}, expected {spec.dtype}")
            if arr.ndim != len(spec.shape):
                problems.append(
                    f"'{name}' has rank {arr.ndim} (shape {list(arr.shape)}), expected rank "
                    f"{len(spec.shape)} ({list(spec.shape)})"
                )
                continue
            for axis, (size, want) in enumerate(zip(arr.shape, spec.shape)):
                if isinstance(want, int):
                    if size != want:
                        problems.append(f"'{name}' axis {axis} is {size}, expected {want}")
                    continue
                rng = self.manifest.io.dims.get(want)
                if rng is not None and not rng.min <= size <= rng.max:
                    problems.append(
                        f"'{name}' axis {axis} ('{want}') is {size}, outside the built range "
                        f"{rng.min}..{rng.max}"
                    )
                if want in seen_dims and seen_dims[want][0] != size:
                    other_size, other = seen_dims[want]
                    problems.append(
                        f"dim '{want}' is {size} in '{name}' but {other_size} in '{other}'; inputs sharing "
                        "a dim must agree"
                    )
                seen_dims.setdefault(want, (size, name))
        problems += value_problems(arrays, self.manifest.io.values)
        if problems:
            expected = "; ".join(s.describe() for s in specs.values())
            ranges = ", ".join(f"{k}={v.min}..{v.max}" for k, v in self.manifest.io.dims.items())
            raise InvalidInput(
                f"Inputs do not fit engine '{self.manifest.name}': {'; '.join(problems)}. It expects "
                f"{expected}" + (f" with {ranges}" if ranges else "") + ". Fix the inputs, or rebuild with a "
                "wider range (--shapes NAME=MIN:OPT:MAX)."
            )
        return arrays


def value_problems(arrays: Mapping[str, np.ndarray], hints: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Integer inputs outside the range the manifest records for them (token ids: 0 .. vocabulary - 1).
    An embedding lookup does not fail on them: ONNX Runtime's Gather reads index -1 as the last row
    (ONNX allows negative indices), so -1 ... -vocab would give another token's answer silently."""
    problems = []
    for name, arr in arrays.items():
        hint = hints.get(name) or {}
        if hint.get("kind") != "randint" or arr.dtype.kind not in "iu" or arr.size == 0:
            continue
        low, high = int(hint.get("low", 0)), int(hint.get("high", 0))
        lo, hi = int(arr.min()), int(arr.max())
        if lo < low or hi >= high:
            problems.append(f"'{name}' holds values {lo}..{hi}, outside the valid range {low}..{high - 1} the "
                            "manifest records (for token ids: the vocabulary)")
    return problems
