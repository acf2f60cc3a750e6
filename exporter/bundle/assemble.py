"""Assembling a bundle (the pipeline's last stage, the same for every recipe): the gate's evidence
(parity.json, report.html) and the manifest written into the staging folder, then either published
(renamed into place) or, when the gate failed, kept at `<output>.rejected` with one ParityError
paragraph. A killed or failed build leaves nothing half-written at the output path."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.bundle.staging import keep_rejected, new_staging, publish
from exporter.gate.parity import ParityReport, format_failures
from exporter.gate.report import write_html
from runtimes.errors import BuildError, ParityError
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
        shutil.rmtree(staging, ignore_errors=True)


def finish_bundle(bundle: Path, output: Path, manifest: Manifest, report: ParityReport, *, title: str,
                  context: dict[str, Any], timings: dict[str, float],
                  failure: Callable[[str, Path], str]) -> BuildResult:
    """Write the gate's evidence and the manifest into `bundle`, then publish it at `output`, or keep it
    at `<output>.rejected` and raise ParityError(failure(failures, rejected_path)) when the gate failed."""
    manifest.parity = report.summary()
    (bundle / "parity.json").write_text(report.to_json() + "\n", encoding="utf-8")
    write_html(report, bundle / "report.html", title=title, context=context)
    manifest.write(bundle)
    if report.status == "failed":
        rejected = keep_rejected(bundle, output)
        raise ParityError(failure(format_failures(report), rejected))
    publish(bundle, output)
    return BuildResult(output, manifest, report, timings)
