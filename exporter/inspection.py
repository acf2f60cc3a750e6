"""`enginekit inspect`: a bundle's manifest or an ONNX file's graph at a glance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exporter.export.onnxutil import io_from_onnx, load_onnx_checked, recorded_dims, summarize
from runtimes.errors import SourceError, UsageError
from runtimes.manifest import MANIFEST_NAME, Manifest


def inspect_path(path: Path, *, layers: bool = False) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        m = Manifest.read(path)
        sizes = {f: (path / f).stat().st_size for f in m.target.engine_files if (path / f).exists()}
        graphs = {f: m.file(path, f, "engine file") for f in m.target.engine_files if f.endswith(".onnx")}
        for part in m.target.options.get("parts", {}).values():  # a zero-shot bundle: one bundle per tower
            sub = Manifest.read(path / part)
            sizes.update({f"{part}/{f}": (path / part / f).stat().st_size for f in sub.target.engine_files})
            graphs.update({f"{part}/{f}": sub.file(path / part, f, "engine file")
                           for f in sub.target.engine_files if f.endswith(".onnx")})
        out = {"kind": "bundle", "path": str(path), "manifest": m.to_dict(), "file_bytes": sizes}
        if layers:
            if not graphs:
                raise UsageError(
                    f"Expected an ONNX engine in bundle '{path}' to list its layers, found a {m.target.backend} engine "
                    f"({', '.join(m.target.engine_files)}): a TensorRT plan keeps no ONNX graph. Inspect the ONNX it was "
                    "built from instead (`enginekit inspect model.onnx --layers`), or TensorRT's engine inspector."
                )
            out["layers"] = {name: _layers(load_onnx_checked(graph)) for name, graph in graphs.items()}
        return out
    if path.is_file() and path.suffix == ".onnx":
        model = load_onnx_checked(path)
        inputs, outputs, _, _ = io_from_onnx(model)
        out: dict[str, Any] = {
            "kind": "onnx", "path": str(path),
            "inputs": [s.describe() for s in inputs], "outputs": [s.describe() for s in outputs],
            "dims": {k: str(v) for k, v in recorded_dims(model).items()},
            **summarize(model),
        }
        if layers:
            out["layers"] = _layers(model)
        return out
    raise SourceError(
        f"Expected an engine bundle folder (with {MANIFEST_NAME}) or an .onnx file, found "
        f"{'a folder without a manifest' if path.is_dir() else 'nothing' if not path.exists() else 'another file'} at "
        f"'{path}'."
    )


def _layers(model: Any) -> str:
    """Every node with its inputs and outputs, in Polygraphy's format."""
    from polygraphy.backend.onnx.util import str_from_onnx

    return str(str_from_onnx(model, show_layers=True, show_attrs=False, show_weights=False))
