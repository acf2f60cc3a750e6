"""Model sources: `hf:<dir or hub id>[#task]`, `py:<module or file.py>:<factory>`, `onnx:<path>`,
`timm:<name>[#pretrained]`: the spec (SourceSpec, parse_source) and what loading one gives (LoadedSource),
which the pipeline can export and check; the loaders themselves are in exporter/source/loading.py.

A LoadedSource carries the torch module to export (a wrapper whose forward takes the inputs in
IOSpec order and returns a tuple of named outputs), the IOSpec (inputs, dims, value hints), and
computes reference outputs (torch fp32; for onnx: sources, ONNX Runtime on the fp32 ONNX).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtimes.errors import SourceError
from runtimes.manifest import IOSpec

KINDS = ("hf", "py", "onnx", "timm")


@dataclass(frozen=True)
class SourceSpec:
    kind: str
    location: str
    task: str | None = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.location}" + (f"#{self.task}" if self.task else "")


def parse_source(text: str) -> SourceSpec:
    """Parse a SOURCE argument. Without a prefix, '*.onnx' means onnx: and a folder means hf:."""
    raw = text.strip()
    kind, sep, rest = raw.partition(":")
    if not sep or kind not in KINDS or (len(kind) == 1 and os.name == "nt"):
        if raw.endswith(".onnx"):
            kind, rest = "onnx", raw
        elif Path(raw).is_dir():
            kind, rest = "hf", raw
        else:
            raise SourceError(
                f"Expected SOURCE as hf:<folder or hub id>[#task], py:<module>:<factory>, onnx:<file> or "
                f"timm:<name>, found '{text}'. Example: enginekit build hf:./my-model --target ort."
            )
    location, _, task = rest.partition("#") if kind in ("hf", "timm") else (rest, "", "")
    if not location:
        raise SourceError(f"Expected a location after '{kind}:' in SOURCE '{text}', found nothing.")
    if kind in ("hf", "onnx") and Path(location).expanduser().exists():
        location = str(Path(location).expanduser().resolve())
    return SourceSpec(kind, location, task or None)


@dataclass
class LoadedSource:
    spec: SourceSpec
    name: str
    io: IOSpec  # outputs are filled in by the export
    module: Any | None = None  # torch.nn.Module wrapper; None for onnx: sources
    onnx_path: Path | None = None  # onnx: sources only
    info: dict[str, Any] = field(default_factory=dict)  # task, family, class: recorded in the manifest
    tokenizer_dir: Path | None = None  # where text data is tokenized from
    hf_model: Any | None = None  # the PreTrainedModel, for transformers' own exporter
    device: str = "cpu"  # where the torch reference runs ("cuda" for GPU builds: strict FP32, no TF32)
    reference_onnx: Path | None = None  # onnx: sources whose metadata names an FP32 reference beside them

    def reference(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """FP32 reference outputs for `feeds`: the torch module, or ORT on the source ONNX."""
        if self.module is not None:
            return run_torch(self.module, self.io, feeds, device=self.device)
        from runtimes._deps import require

        ort = require("onnxruntime", extra="cpu", purpose="The reference run of an onnx: source")
        if not hasattr(self, "_ref_session"):
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            so.log_severity_level = 3
            self._ref_session = ort.InferenceSession(str(self.reference_onnx or self.onnx_path), so,
                                                     providers=["CPUExecutionProvider"])
        names = [o.name for o in self.io.outputs]
        return dict(zip(names, self._ref_session.run(names, dict(feeds))))


def run_torch(module: Any, io: IOSpec, feeds: Mapping[str, np.ndarray], device: str = "cpu") -> dict[str, np.ndarray]:
    import torch

    dtypes = {s.name: s.dtype for s in io.inputs}
    # The reference is FP32 whatever the engine takes (native FP16 I/O casts back here).
    args = tuple(torch.from_numpy(np.ascontiguousarray(np.asarray(feeds[n]).astype(np.float32)
                                                       if np.asarray(feeds[n]).dtype.kind == "f" else feeds[n]))
                 for n in dtypes)
    if device == "cuda":
        module.to("cuda")
        args = tuple(a.to("cuda") for a in args)
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # strict FP32 reference
    try:
        with torch.inference_mode():
            outs = module(*args)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    names = module.output_names
    return {n: (o.detach().float() if o.dtype == torch.bfloat16 else o.detach()).cpu().numpy() for n, o in zip(names, outs)}


def named_outputs(out: Any, prefix: str = "output") -> dict[str, Any]:
    """Flatten a model's return value into {name: tensor}: ModelOutput/dict keys keep their names,
    tuples become output_0, output_1...; nested model outputs, caches and None are dropped."""
    import torch

    if isinstance(out, torch.Tensor):
        return {prefix: out}
    if isinstance(out, Mapping):
        return {str(k): v for k, v in out.items() if isinstance(v, torch.Tensor)}
    if isinstance(out, (tuple, list)):
        flat: dict[str, Any] = {}
        for i, v in enumerate(out):
            if isinstance(v, torch.Tensor):
                flat[f"{prefix}_{i}"] = v
            elif isinstance(v, (tuple, list)):
                flat.update(named_outputs(v, f"{prefix}_{i}"))
        return flat
    return {}


def make_wrapper(model: Any, input_names: list[str], call: Callable[[Any, dict[str, Any]], Any], example: Mapping[str, np.ndarray]) -> Any:
    """Wrap `model` so forward(*inputs in order) returns a tuple of named tensor outputs."""
    import torch

    class OutputsAsTuple(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.input_names = list(input_names)
            self.output_names: list[str] = []

        def forward(self, *args: Any) -> tuple[Any, ...]:
            outs = named_outputs(call(self.model, dict(zip(self.input_names, args))))
            return tuple(outs[n] for n in self.output_names)

    wrapper = OutputsAsTuple().eval()
    with torch.inference_mode():
        first = named_outputs(call(model, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in example.items()}))
    if not first:
        raise SourceError(
            f"Expected the model ({type(model).__name__}) to return tensors (a tensor, a tuple or a dict of "
            "them), found none in its output. Return the tensors to export from forward()."
        )
    wrapper.output_names = list(first)
    return wrapper


def model_name(spec: SourceSpec) -> str:
    """A short name for default bundle folders: the folder, file or factory name."""
    if spec.kind == "py":
        base = spec.location.rsplit(":", 1)[-1]
    else:
        base = Path(spec.location.rstrip("/")).name
        base = base[: -len(".onnx")] if base.endswith(".onnx") else base
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-").lower() or "model"
