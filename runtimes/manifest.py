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
import re
import shlex
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal

from .choices import Kind
from .errors import IncompatibleEngine

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
# The backend name a composite CLIP bundle records: one engine bundle per tower inside (runtimes/zeroshot.py).
ZERO_SHOT_BACKEND = "zero-shot"
ShapePoint = Literal["min", "opt", "max"]
# Element types a manifest may name for an input or output: numpy's, plus the ONNX types numpy lacks.
DTYPES = frozenset({
    "bool", "int4", "uint4", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "bfloat16", "float32", "float64", "float8e4m3fn", "float8e4m3fnuz", "float8e5m2", "float8e5m2fnuz",
})
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


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
            manifest = cls.from_dict(raw)
            problems = _structure_problems(manifest)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            problems = [f"it is malformed ({type(exc).__name__}: {str(exc)[:200]})"]
        if problems:
            raise IncompatibleEngine(
                f"Expected a complete enginekit manifest in {path}, but {'; '.join(problems)}. A bundle that does "
                "not say exactly which of its own files it runs is not loaded. Rebuild it with `enginekit build`."
            )
        check_confined(bundle, manifest)
        return manifest

    def hashed(self, bundle: str | os.PathLike[str]) -> Manifest:
        """A copy whose `files` also list the engine files with their sha256 as they are in `bundle` now: the
        build gates its staging bundle before the manifest is final, through the same rule as every load."""
        files = {**self.files, **{f: file_sha256(confined_path(Path(bundle), f, "engine file"))
                                  for f in self.target.engine_files}}
        return replace(self, files=files)

    def file(self, bundle: str | os.PathLike[str], rel: str, what: str = "file") -> Path:
        """`bundle / rel` for a file this manifest lists with its sha256 in `files`, inside the bundle
        (symlinks resolved); IncompatibleEngine for anything else. Every file the runtime opens comes
        from here, so a manifest cannot point a loader at a file outside its bundle or one never hashed."""
        if rel not in self.files:
            raise IncompatibleEngine(
                f"Expected the {what} '{str(rel)[:200]}' of bundle '{bundle}' to be listed with its sha256 in the "
                f"manifest's files ({', '.join(sorted(self.files)[:8]) or 'none listed'}), but it is not: an unlisted "
                f"file is never run. Rebuild the bundle with: {self.rebuild_command}"
            )
        return confined_path(Path(bundle), rel, what)


def _structure_problems(m: Manifest) -> list[str]:
    """What makes a parsed manifest unusable: wrong types, unknown dtypes, engine files not hashed."""
    problems = []
    if not isinstance(m.files, dict) or not all(isinstance(k, str) and isinstance(v, str) and _SHA256.match(v)
                                                for k, v in m.files.items()):
        return ["'files' is not a map of relative path -> sha256 hex digest"]
    engine_files = m.target.engine_files
    if not isinstance(engine_files, list) or not all(isinstance(f, str) for f in engine_files):
        return [f"target.engine_files is {type(engine_files).__name__}, not a list of file names"]
    if not engine_files and m.target.backend != ZERO_SHOT_BACKEND:
        problems.append("target.engine_files is empty (no engine to load)")
    unlisted = [f for f in engine_files if f not in m.files]
    if unlisted:
        problems.append(f"engine file(s) {[f[:200] for f in unlisted][:4]} are not listed with a sha256 in 'files'")
    for spec in m.io.inputs + m.io.outputs:
        if not isinstance(spec.name, str) or spec.dtype not in DTYPES:
            problems.append(f"io entry {str(spec.name)[:100]!r} has dtype {str(spec.dtype)[:50]!r}, not one of "
                            f"{', '.join(sorted(DTYPES))}")
        elif not all(isinstance(d, (int, str)) and not isinstance(d, bool) for d in spec.shape):
            problems.append(f"io entry '{spec.name[:100]}' has a shape that is not made of ints and dim names")
    for name, r in m.io.dims.items():
        if not all(type(v) is int for v in (r.min, r.opt, r.max)):
            problems.append(f"dim '{str(name)[:100]}' has a range that is not three integers")
    if not isinstance(m.build_command, list) or not all(isinstance(a, str) for a in m.build_command):
        problems.append("build_command is not a list of strings")
    return problems


def confined_path(bundle: Path, rel: object, what: str = "file") -> Path:
    """`bundle / rel`, refused (IncompatibleEngine) unless `rel` is a relative, normalised POSIX path
    that stays inside the bundle once symlinks are resolved."""
    text = rel if isinstance(rel, str) else ""
    posix = PurePosixPath(text)
    bad = (not text or "\\" in text or "\0" in text or posix.is_absolute() or PureWindowsPath(text).is_absolute()
           or PureWindowsPath(text).drive or posix.as_posix() != text or any(p in ("..", ".") for p in posix.parts))
    path = Path(bundle) / text
    if not bad:
        root = Path(bundle).resolve()
        bad = not path.resolve().is_relative_to(root)
    if bad:
        raise IncompatibleEngine(
            f"Expected every path in the manifest of bundle '{bundle}' to be relative, normalised and inside the "
            f"bundle, but its {what} is {str(rel)[:200]!r}. A bundle may only name its own files; this one is not "
            "loaded. Rebuild it with `enginekit build`, or remove the altered entry."
        )
    return path


def check_confined(bundle: str | os.PathLike[str], manifest: Manifest) -> None:
    """Every path the manifest names (files, engine files, a zero-shot bundle's tower folders) is inside `bundle`."""
    bundle = Path(bundle)
    for rel in manifest.files:
        confined_path(bundle, rel, "listed file")
    parts = manifest.target.options.get("parts") if isinstance(manifest.target.options, dict) else None
    if manifest.target.backend == ZERO_SHOT_BACKEND:
        if not isinstance(parts, dict):
            raise IncompatibleEngine(
                f"Expected the zero-shot bundle '{bundle}' to name its tower folders in target.options.parts, found "
                f"{type(parts).__name__}. Rebuild it with: {manifest.rebuild_command}"
            )
        for role, folder in parts.items():
            confined_path(bundle, folder, f"'{str(role)[:50]}' tower folder")


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
        p = confined_path(Path(bundle), rel, "listed file")
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
