"""Which TensorRT runtime on which GPU may run a plan: decided from the manifest before the plan
is deserialized, so that a refusal names the reason and the rebuild command instead of a
deserialization failure deep in TensorRT's log. Pure Python; the rules, from NVIDIA's
documentation on engine compatibility:

- A plain plan runs only on the TensorRT version that built it, on a GPU of the same compute
  capability. The lean runtime (`tensorrt_lean`) cannot run it at all.
- A version-compatible plan (--version-compatible) carries the lean runtime and runs on the
  same or a later TensorRT of the same major version; TensorRT 10 plans also run on TensorRT 11.
  Built with --exclude-lean-runtime it carries none, and needs the lean (or full) runtime of
  exactly the version that built it.
- Hardware compatibility: 'ampere+' plans run on any GPU of compute capability ≥ 8.0; 'none' and
  'same-cc' plans on the compute capability they were built on. TensorRT 11 needs ≥ 7.5.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

HARDWARE_COMPAT = ("none", "ampere+", "same-cc")
AMPERE_CC = (8, 0)
TRT11_MIN_CC = (7, 5)
# Cross-major pairs NVIDIA supports for version-compatible plans: (built with, run on).
CROSS_MAJOR = {(10, 11)}


def parse_version(text: str) -> tuple[int, ...]:
    """'10.13.0.35' → (10, 13, 0, 35); non-numeric tails ('11.4.0.106+cuda13') are ignored."""
    parts = []
    for piece in str(text).split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts)


@dataclass(frozen=True)
class PlanInfo:
    """What the manifest recorded about how a plan was built."""

    tensorrt: str
    compute_capability: tuple[int, int] | None
    gpu_name: str
    version_compatible: bool = False
    exclude_lean_runtime: bool = False
    hardware_compat: str = "none"

    @classmethod
    def from_target(cls, target: Any) -> PlanInfo:
        gpu = target.gpu or {}
        cc = gpu.get("compute_capability")
        return cls(
            tensorrt=str(target.versions.get("tensorrt", "")),
            compute_capability=(int(cc[0]), int(cc[1])) if cc else None,
            gpu_name=str(gpu.get("name", "unknown GPU")),
            version_compatible=bool(target.options.get("version_compatible", False)),
            exclude_lean_runtime=bool(target.options.get("exclude_lean_runtime", False)),
            hardware_compat=str(target.options.get("hardware_compat", "none")),
        )

    def describe(self) -> str:
        cc = ".".join(map(str, self.compute_capability)) if self.compute_capability else "?"
        flags = [f for f, on in (("version-compatible", self.version_compatible),
                                 ("without the lean runtime", self.exclude_lean_runtime)) if on]
        if self.hardware_compat != "none":
            flags.append(f"hardware-compatible {self.hardware_compat}")
        return (f"TensorRT {self.tensorrt} on {self.gpu_name} (compute capability {cc})"
                + (f", {', '.join(flags)}" if flags else ", not version- or hardware-compatible"))

    def runtime_candidates(self) -> tuple[str, ...]:
        """Python modules that may deserialize the plan, best first."""
        if not self.version_compatible:
            return ("tensorrt",)
        if self.exclude_lean_runtime:
            # The documented route for such plans is the lean runtime of the same version.
            return ("tensorrt_lean", "tensorrt")
        return ("tensorrt", "tensorrt_lean")


def compatibility_problems(plan: PlanInfo, module: str, runtime_version: str,
                           device_cc: tuple[int, int] | None) -> list[str]:
    """Why `module` (tensorrt or tensorrt_lean) at `runtime_version` on a GPU of compute
    capability `device_cc` cannot run `plan`; empty when nothing speaks against it."""
    problems = []
    if module == "tensorrt_lean" and not plan.version_compatible:
        problems.append("the lean runtime (tensorrt_lean) runs only plans built --version-compatible")
    built, have = parse_version(plan.tensorrt)[:3], parse_version(runtime_version)[:3]
    if built and have:
        if not plan.version_compatible or plan.exclude_lean_runtime:
            if have != built:
                why = "the plan carries no lean runtime" if plan.version_compatible else "the plan is not version-compatible"
                problems.append(f"{module} {runtime_version} is not the TensorRT {plan.tensorrt} that built it "
                                f"and {why}")
        elif have < built:
            problems.append(f"{module} {runtime_version} is older than the TensorRT {plan.tensorrt} that built it")
        elif have[0] != built[0] and (built[0], have[0]) not in CROSS_MAJOR:
            problems.append(f"version-compatible plans of TensorRT {built[0]} do not run on TensorRT {have[0]}")
    if device_cc is not None:
        if have and have[0] >= 11 and device_cc < TRT11_MIN_CC:
            problems.append(f"TensorRT {have[0]} needs compute capability ≥ 7.5, this GPU has "
                            f"{device_cc[0]}.{device_cc[1]}")
        if plan.hardware_compat == "ampere+":
            if device_cc < AMPERE_CC:
                problems.append(f"the plan is hardware-compatible for Ampere and newer (compute capability ≥ 8.0), "
                                f"this GPU has {device_cc[0]}.{device_cc[1]}")
        elif plan.compute_capability is not None and device_cc != plan.compute_capability:
            problems.append(f"the plan was built for compute capability {plan.compute_capability[0]}."
                            f"{plan.compute_capability[1]}, this GPU has {device_cc[0]}.{device_cc[1]}")
    return problems
