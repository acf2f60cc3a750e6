"""The bundle manifest: what an engine is, where it came from, what it was proven to compute.

Build time writes it (exporter.bundle), run time reads it (runtimes.load); the two meet only
through this file. Plain dataclasses and json, no third-party schema library: the runtime must
stay numpy + one backend.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .choices import Kind
from .errors import IncompatibleEngine

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
# The backend name a composite CLIP bundle records: one engine bundle per tower inside (runtimes/zeroshot.py).
ZERO_SHOT_BACKEND = "zero-shot"
ShapePoint = Literal["min", "opt", "max"]


@dataclass(frozen=True)
class DimRange:
    """The range a dynamic dimension may take; `opt` is what engines are tuned for."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"need 1 <= min <= opt <= max, got {self.min}:{self.opt}:{self.max}")

    def at(self, point: ShapePoint) -> int:
        return int(getattr(self, point))

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. `shape` holds ints (static) and dim names (see IOSpec.dims)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def describe(self) -> str:
        return f"{self.name}: {self.dtype}[{', '.join(str(d) for d in self.shape)}]"


@dataclass
class IOSpec:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dims: dict[str, DimRange] = field(default_factory=dict)
    # How to make valid sample values per input, e.g. {"input_ids": {"kind": "randint", "high": 30522}}
    # (see exporter.inputs); lets bench, serve warm-up and `parity` make inputs from a bundle alone.
    values: dict[str, dict[str, Any]] = field(default_factory=dict)

    def shape_at(self, spec: TensorSpec, point: ShapePoint) -> tuple[int, ...]:
        """The concrete shape of `spec` with every named dim at its min, opt or max."""
        out = []
        for d in spec.shape:
            if isinstance(d, int):
                out.append(d)
            elif d in self.dims:
                out.append(self.dims[d].at(point))
            else:
                raise KeyError(f"dim '{d}' of '{spec.name}' has no recorded range")
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [asdict(t) for t in self.inputs],
            "outputs": [asdict(t) for t in self.outputs],
            "dims": {k: asdict(v) for k, v in self.dims.items()},
            "values": self.values,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IOSpec:
        def spec(t: dict[str, Any]) -> TensorSpec:
            return TensorSpec(t["name"], t["dtype"], tuple(t["shape"]))

        return cls(
            inputs=[spec(t) for t in d["inputs"]],
            outputs=[spec(t) for t in d["outputs"]],
            dims={k: DimRange(**v) for k, v in d.get("dims", {}).items()},
            values=dict(d.get("values", {})),
        )


@dataclass
class Target:
    """What runs the engine. `options` and `versions` record what the build actually used."""

    backend: str  # "ort" | "trt"
    device: str  # "cpu" | "cuda"
    engine_files: list[str]  # relative to the bundle; the first is the one to load
    providers: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    gpu: dict[str, Any] | None = None


@dataclass
class Manifest:
    name: str
    source: dict[str, Any]
    io: IOSpec
    precision: dict[str, Any]
    target: Target
    build_command: list[str]
    calibration: dict[str, Any] | None = None
    parity: dict[str, Any] | None = None
    files: dict[str, str] = field(default_factory=dict)
    enginekit_version: str = ""
    created_at: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat())
    schema_version: int = SCHEMA_VERSION

    @property
    def kind(self) -> Kind:
        """What the bundle holds (runtimes.choices.Kind), from the manifest alone: bundles written before
        this property existed carry the same fields (target.backend, target.options.generation)."""
        if self.target.backend == ZERO_SHOT_BACKEND:
            return Kind.ZERO_SHOT
        generation = self.target.options.get("generation")
        if isinstance(generation, dict):
            return Kind.VISION_LANGUAGE if "vision" in generation else Kind.GENERATION
        return Kind.ENGINE

    @property
    def rebuild_command(self) -> str:
        return shlex.join(self.build_command)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["io"] = self.io.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        d = dict(d)
        d["io"] = IOSpec.from_dict(d["io"])
        d["target"] = Target(**d["target"])
        return cls(**d)

    def write(self, bundle: Path) -> None:
        """Write manifest.json atomically (temp file + rename) into `bundle`."""
        write_json_atomic(Path(bundle) / MANIFEST_NAME, self.to_dict())

    @classmethod
    def read(cls, bundle: str | os.PathLike[str]) -> Manifest:
        """Read and check a bundle's manifest; IncompatibleEngine when it is not one we can read."""
        bundle = Path(bundle)
        path = bundle / MANIFEST_NAME
        if not bundle.is_dir():
            raise IncompatibleEngine(
                f"Expected an engine bundle folder (one holding {MANIFEST_NAME}), but '{bundle}' "
                f"{'is a file' if bundle.exists() else 'does not exist'}. Build one with "
                "`enginekit build SOURCE -o DIR`, or pass the folder that `build` printed."
            )
        if not path.is_file():
            raise IncompatibleEngine(
                f"Expected '{bundle}' to be an engine bundle with a {MANIFEST_NAME}, but it has none "
                f"(found: {', '.join(sorted(p.name for p in bundle.iterdir())[:8]) or 'an empty folder'}). "
                "Build a bundle with `enginekit build SOURCE -o DIR`."
            )
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IncompatibleEngine(
                f"Expected {path} to be JSON written by enginekit, but it cannot be parsed ({exc}). "
                "The bundle is damaged: rebuild it with `enginekit build`."
            ) from None
        version = raw.get("schema_version") if isinstance(raw, dict) else None
        if version != SCHEMA_VERSION:
            raise IncompatibleEngine(
                f"Expected manifest schema {SCHEMA_VERSION}, found {version!r} in {path}. This bundle was "
                f"written by another enginekit version; rebuild it with this one"
                + (f": {shlex.join(raw['build_command'])}" if isinstance(raw, dict) and raw.get("build_command") else ".")
            )
        try:
            return cls.from_dict(raw)
        except (KeyError, TypeError, ValueError) as exc:
            raise IncompatibleEngine(
                f"Expected a complete enginekit manifest in {path}, but it is malformed ({exc!r}). "
                "Rebuild the bundle with `enginekit build`."
            ) from None


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_files(bundle: Path, manifest: Manifest) -> None:
    """Refuse a bundle whose files differ from what the build recorded (IncompatibleEngine)."""
    problems = []
    for rel, digest in manifest.files.items():
        p = Path(bundle) / rel
        if not p.is_file():
            problems.append(f"{rel} is missing")
        elif file_sha256(p) != digest:
            problems.append(f"{rel} was modified after the build (sha256 differs)")
    if problems:
        raise IncompatibleEngine(
            f"Expected the files of bundle '{bundle}' to match the sha256 recorded at build time, but "
            f"{'; '.join(problems)}. An altered engine is not run. Rebuild it with: {manifest.rebuild_command}"
        )


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
