"""The typed values a build and a bundle are described by: Precision, Device and the bundle's Kind.

Each is a `str` enum: it compares equal to its value ("fp16" == Precision.FP16), prints and
serialises (JSON, f-strings) as the value, and is parsed once where input enters (the CLI, the
BuildOptions of the Python API, a manifest), with one paragraph naming the choices when it is none
of them. Code past that point asks the value (`precision.mixed`) instead of comparing strings.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

from .errors import UsageError

C = TypeVar("C", bound="Choice")


class Choice(str, Enum):
    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def parse(cls: type[C], value: object, what: str, hint: str = "") -> C:
        """`value` as a member, or UsageError naming `what` (e.g. '--precision'), the choices and `hint`."""
        if isinstance(value, cls):
            return value
        text = str(value).strip().lower()
        for member in cls:
            if member.value == text:
                return member
        raise UsageError(f"Expected {what} to be one of {', '.join(m.value for m in cls)}, found '{value}'."
                         + (f" {hint}" if hint else ""))


class Precision(Choice):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    FP8 = "fp8"
    INT4 = "int4"  # weight-only, causal LMs on ONNX Runtime GenAI (MatMulNBits); no other recipe takes it

    @property
    def mixed(self) -> bool:
        """FP16/BF16: mixed precision in the graph (AutoCast), sensitive nodes kept in FP32."""
        return self in (Precision.FP16, Precision.BF16)

    @property
    def quantized(self) -> bool:
        """INT8/FP8: explicit Q/DQ nodes from calibration."""
        return self in (Precision.INT8, Precision.FP8)

    @property
    def reduced(self) -> bool:
        return self is not Precision.FP32

    @property
    def cpu_has_kernels(self) -> bool:
        """Whether ONNX Runtime's CPU provider computes this precision at all (no BF16, no FP8 kernels)."""
        return self not in (Precision.BF16, Precision.FP8)


class Device(Choice):
    CPU = "cpu"
    CUDA = "cuda"

    @property
    def gpu(self) -> bool:
        return self is Device.CUDA


class Kind(Choice):
    """What a bundle holds, hence what loads it: one engine (runtimes.load), two tower bundles
    (zero-shot, runtimes.load too), prefill + decode engines (runtimes.generate), or those plus a vision
    engine (vision-language, runtimes.generate / runtimes.vlm)."""

    ENGINE = "engine"
    ZERO_SHOT = "zero-shot"
    GENERATION = "generation"
    VISION_LANGUAGE = "vision-language"
