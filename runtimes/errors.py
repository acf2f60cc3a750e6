"""The one family of user-facing errors.

A user error says, in one paragraph, what was expected, what was found and what to run next; the
CLI prints it without a traceback and exits non-zero. Anything else that escapes is a bug and
keeps its traceback. The family lives in `runtimes` (the bottom of the dependency graph) so the
thin runtime, `calibration` and `exporter` all raise the same classes.
"""

from __future__ import annotations


class EnginekitError(Exception):
    """Base of every error a user can cause and fix. `exit_code` is what the CLI returns."""

    exit_code = 2


class SourceError(EnginekitError):
    """The model source (hf:, py:, onnx:, timm:) is missing, malformed or not a model."""


class ExportError(EnginekitError):
    """torch → ONNX failed in a way the user can act on (unsupported op, untraceable code)."""


class BuildError(EnginekitError):
    """ONNX → engine failed (invalid ONNX, provider refused the graph, output folder exists)."""


class ParityError(EnginekitError):
    """The parity gate failed: the engine does not compute what the reference computes."""

    exit_code = 1


class MissingDependency(EnginekitError):
    """An optional package (an extra) is needed and not installed."""


class IncompatibleEngine(EnginekitError):
    """A bundle this machine cannot run: altered files, missing provider, other runtime version."""


class EngineRefused(IncompatibleEngine):
    """The runtime for the bundle's device is here and refused its engine (an invalid graph): never a
    reason to publish a bundle 'not checked'."""


class InvalidInput(EnginekitError):
    """Inputs given to `Runner.infer` do not match the engine's names, dtypes or shapes."""


class DataError(EnginekitError):
    """A data file (parity inputs, calibration data) is missing, empty or does not fit the model."""


class UsageError(EnginekitError):
    """An option value is not one the command accepts (unknown precision or target, bad --shapes)."""
