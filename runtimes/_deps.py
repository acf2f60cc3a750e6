"""Optional imports that name the extra to install when they are missing."""

from __future__ import annotations

import importlib
import importlib.util
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


# What `enginekit build` and the other build-time commands import (the `build` extra).
BUILD_MODULES = ("torch", "onnx", "onnxscript", "onnx_ir", "transformers")


def require_build_toolchain(command: str, modules: tuple[str, ...] = BUILD_MODULES) -> None:
    """Raise one MissingDependency paragraph when a build-time command runs on a runtime-only install
    (`pip install 'enginekit[cpu,serve]'`: numpy, onnxruntime and the service, no torch)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependency(
            f"Expected the build toolchain for `enginekit {command}` ({', '.join(modules)}: the `build` extra), but "
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed here: this is a runtime-only "
            "install, which loads, runs and serves bundles (runtimes.load, enginekit serve, generate, bench without "
            "baselines) but does not build them. Install the extra with: pip install -c lock/requirements.txt "
            "'enginekit[build,cpu]' (in a checkout: make install), then run the command again."
        )
