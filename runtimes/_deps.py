"""Optional imports that name the extra to install when they are missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependency


def missing_dependency(module: str, *, extra: str, purpose: str, exc: BaseException) -> MissingDependency:
    """The MissingDependency that `require` raises, for callers that import a module themselves
    (to keep its static type, or to try a second module first)."""
    return MissingDependency(
        f"{purpose} needs the Python module '{module}', which cannot be imported here ({exc}). "
        f"Install it with: pip install 'enginekit[{extra}]' (or the package that provides "
        f"'{module}'), then run the command again."
    )


def require(module: str, *, extra: str, purpose: str) -> ModuleType:
    """Import `module` or raise MissingDependency naming `pip install 'enginekit[extra]'`."""
    try:
        return importlib.import_module(module)
    # OSError too: wheels that wrap native libraries (tensorrt) raise it when a .so is missing.
    except (ImportError, OSError) as exc:
        raise missing_dependency(module, extra=extra, purpose=purpose, exc=exc) from None


def version_of(module: str) -> str | None:
    """The module's __version__ if it imports, else None (used by `doctor` and manifests)."""
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:
        return None
