"""Assembling a bundle (the pipeline's last stage, the same for every recipe): the gate's evidence
(parity.json, report.html) and the manifest written into the staging folder, then either published
(renamed into place) or, when the gate failed, kept at `<output>.rejected` with one ParityError
paragraph. A killed or failed build leaves nothing half-written at the output path."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.bundle.staging import keep_rejected, new_staging, publish, remove_staging
from exporter.gate.parity import ParityReport, format_failures
from exporter.gate.report import write_html
from exporter.options import shown_path
from runtimes.errors import BuildError, EnginekitError, ParityError
from runtimes.manifest import Manifest


@dataclass
class BuildResult:
    bundle: Path
    manifest: Manifest
    parity: ParityReport
    timings: dict[str, float]


def check_output(output: Path, force: bool) -> None:
    """Refuse an existing output folder unless --force (before anything is built)."""
    if output.exists() and not force:
        raise BuildError(
            f"Expected the output folder '{output}' not to exist, but it does. Pass --force to replace it, or "
            "-o to choose another folder; nothing was written."
        )


@contextmanager
def staging_for(output: Path) -> Iterator[Path]:
    """A hidden sibling folder of `output` to assemble in; removed afterwards, whatever happens."""
    staging = new_staging(output)
    try:
        yield staging
    finally:
        remove_staging(staging)


def finish_bundle(bundle: Path, output: Path, manifest: Manifest, report: ParityReport, *, title: str,
                  context: dict[str, Any], timings: dict[str, float],
                  failure: Callable[[str, Path], str]) -> BuildResult:
    """Write the gate's evidence and the manifest into `bundle`, then publish it at `output`, or keep it
    at `<output>.rejected` and raise ParityError(failure(failures, rejected_path)) when the gate failed."""
    manifest.parity = report.summary()
    (bundle / "parity.json").write_text(report.to_json() + "\n", encoding="utf-8")
    write_html(report, bundle / "report.html", title=title, context=context, precision=manifest.precision)
    manifest.write(bundle)
    if report.status == "failed":
        rejected = keep_rejected(bundle, output)
        raise ParityError(failure(format_failures(report), Path(shown_path(rejected))))
    publish(bundle, output)
    return BuildResult(output, manifest, report, timings)


def keep_named_files(exc: EnginekitError, staging: Path, output: Path) -> EnginekitError | None:
    """`exc` again, its message naming `<output>.rejected/NAME` instead of each file of `staging` it
    names (an ONNX Runtime or TensorRT refusal names the graph it refused; the staging folder is
    removed before the message is read). Those files are moved there, an ONNX one with the external
    data it references. None when the message names no file of `staging`."""
    text = str(exc)
    roots = sorted({str(staging), str(Path(staging).resolve())}, key=len, reverse=True)
    named = [m.rstrip(".:") for m in re.findall("(?:" + "|".join(map(re.escape, roots)) + r")[^\s'\"`,;()]*", text)]
    if not named:
        return None
    rejected = output.with_name(output.name + ".rejected")
    keep = new_staging(rejected)
    shown: dict[str, str] = {}
    try:
        for name in dict.fromkeys(named):
            path = Path(name)
            if path.exists() and path.resolve() != Path(staging).resolve() and not (keep / path.name).exists():
                _move_with_data(path, keep / path.name)
            if (keep / path.name).exists():
                shown[name] = shown_path(rejected / path.name)
        if shown:
            publish(keep, rejected)
    finally:
        remove_staging(keep)
    for name in sorted(dict.fromkeys(named), key=len, reverse=True):
        text = text.replace(name, shown.get(name, "(a temporary file of the build, removed with it)"))
    return type(exc)(text)


def _move_with_data(src: Path, dst: Path) -> None:
    """Move a file or folder; an .onnx file takes the external data files it references along."""
    if src.suffix == ".onnx" and src.is_file():
        import onnx

        from exporter.build.handoff import external_files

        for location in sorted(external_files(onnx.load(str(src), load_external_data=False).graph)):
            if (src.parent / location).is_file():
                (dst.parent / location).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(src.parent / location, dst.parent / location)
    shutil.move(src, dst)
