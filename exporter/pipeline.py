"""The Python API of the build side, in one place:

    from exporter.pipeline import BuildOptions, build, export_model
    result = build("hf:./bert", BuildOptions(precision="fp16"))      # BuildResult: bundle, manifest, parity, timings

`build` selects the source's recipe (exporter/recipes/__init__.py) and runs its stages; `export_model` is
`enginekit export` (source → checked ONNX). The stages themselves live in their own modules:
loading, export, precision/mixed/fallback, engine, gate/parity, bundle.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from exporter.bundle.assemble import BuildResult
from exporter.bundle.staging import new_staging, remove_staging
from exporter.options import DEVICES, TARGETS, BuildOptions, build_command, default_output
from exporter.recipes import RECIPES, build, select_recipe
from exporter.source.spec import parse_source
from exporter.timing import Progress
from runtimes.errors import BuildError, UsageError

__all__ = ["DEVICES", "RECIPES", "TARGETS", "BuildOptions", "BuildResult", "Progress", "build", "build_command",
           "default_output", "export_model", "select_recipe"]


def export_model(source_text: str, output: Path, options: BuildOptions, progress: Progress | None = None) -> Any:
    """`enginekit export`: source → checked ONNX at `output` (+ `<output>.data` for large models),
    written beside the target first and renamed into place."""
    from exporter.export.graph import export_onnx
    from exporter.source.loading import load_source, prepare_dims

    say = progress or (lambda _msg: None)
    spec = parse_source(source_text)
    if spec.kind == "onnx":
        raise UsageError(f"Expected a torch source (hf:, py:, timm:), found '{source_text}', which is already ONNX.")
    output = Path(output)
    if output.exists() and not options.force:
        raise BuildError(f"Expected '{output}' not to exist, but it does. Pass --force to replace it; nothing was written.")
    staging = new_staging(output)
    try:
        say(f"Loading {spec}")
        loaded = load_source(spec)
        loaded.io = prepare_dims(loaded, options.shapes, options.dynamic)
        say("Exporting to ONNX (torch.export → torch.onnx)")
        result = export_onnx(loaded, staging / output.name, opset=options.opset, exporter=options.exporter)
        for f in sorted(staging.iterdir(), key=lambda p: p.name != output.name + ".data"):
            os.replace(f, output.parent / f.name)  # the data file first: the graph never points at nothing
        result.path = output
        return result
    finally:
        remove_staging(staging)
