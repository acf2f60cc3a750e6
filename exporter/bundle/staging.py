"""Writing outputs without losing anything: build in a hidden sibling folder, rename it into place
when done (`publish`); a bundle that failed its gate is kept at `<output>.rejected` (`keep_rejected`)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def new_staging(dest: Path) -> Path:
    """Create and return a hidden, unique sibling folder of `dest` (its parents created too)."""
    staging = dest.parent / f".{dest.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    return staging


def publish(bundle: Path, output: Path) -> None:
    """Rename the finished bundle into place; an existing one (--force) is swapped out, then removed."""
    trash = None
    if output.exists():
        trash = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(output, trash)
    os.replace(bundle, output)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def keep_rejected(bundle: Path, output: Path) -> Path:
    """Move a bundle that failed its gate to `<output>.rejected` (replacing an older one); returns that path."""
    rejected = output.with_name(output.name + ".rejected")
    shutil.rmtree(rejected, ignore_errors=True)
    os.replace(bundle, rejected)
    return rejected
