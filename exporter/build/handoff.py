"""Hand a TensorRT build over to a machine that has TensorRT.

Export and lowering run anywhere; the TensorRT builder needs TensorRT and an NVIDIA GPU. When
`build --target trt` runs where they are missing, the work done so far is not thrown away: the
lowered ONNX is kept beside the output, in `<output>.lowered/`, and the error names the command
that finishes the build from it elsewhere. The kept ONNX carries in its metadata what that
`enginekit build onnx:…` needs: the dim ranges and input value hints, the precision it is already
lowered to (so it is not lowered twice) and, when lowering changed the graph, where the FP32 ONNX
that the parity gate compares against lies (`reference/model.onnx`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import onnx

from exporter.bundle.staging import new_staging, publish, remove_staging
from exporter.export.onnxutil import METADATA_DIMS, METADATA_LOWERED, METADATA_REFERENCE, METADATA_VALUES
from runtimes.errors import MissingDependency
from runtimes.manifest import IOSpec

KEPT_MODEL = "model.onnx"
KEPT_REFERENCE = "reference/model.onnx"


def kept_folder(output: Path) -> Path:
    return output.with_name(output.name + ".lowered")


def keep_lowered(lowered: Path, reference: Path | None, io: IOSpec, precision: str, dest: Path) -> Path:
    """Copy `lowered` (and the FP32 `reference`, if given) with their external data into `dest`,
    written beside it first and renamed into place; returns the kept model's path."""
    meta = {METADATA_DIMS: json.dumps({k: asdict(v) for k, v in io.dims.items()}),
            METADATA_VALUES: json.dumps(io.values)}
    if precision != "fp32":  # an FP32 graph is not lowered: it may still be lowered to anything
        meta[METADATA_LOWERED] = precision
    staging = new_staging(dest)
    try:
        if reference is not None:
            _copy_onnx(reference, staging / KEPT_REFERENCE, {METADATA_DIMS: meta[METADATA_DIMS],
                                                             METADATA_VALUES: meta[METADATA_VALUES]})
            meta[METADATA_REFERENCE] = KEPT_REFERENCE
        _copy_onnx(lowered, staging / KEPT_MODEL, meta)
        publish(staging, dest)  # an older kept folder is swapped out atomically
    finally:
        remove_staging(staging)
    return dest / KEPT_MODEL


def _copy_onnx(src: Path, dst: Path, metadata: dict[str, str]) -> None:
    """Save `src`'s graph at `dst` with `metadata` set; its external data files travel alongside
    under the same relative names, so the graph's references stay valid."""
    model = onnx.load(str(src), load_external_data=False)
    kept = [p for p in model.metadata_props if p.key not in metadata]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    dst.parent.mkdir(parents=True, exist_ok=True)
    for location in sorted(external_files(model.graph)):
        target = dst.parent / location
        target.parent.mkdir(parents=True, exist_ok=True)
        # A copy, not a hard link: the ONNX checker refuses external data with several links.
        shutil.copyfile(src.parent / location, target)
    # Weights were not loaded, so onnx.save writes only the graph and keeps the references.
    onnx.save(model, str(dst))


def external_files(graph: onnx.GraphProto) -> set[str]:
    tensors = list(graph.initializer)
    files = set()
    for node in graph.node:
        for attr in node.attribute:
            tensors += ([attr.t] if attr.HasField("t") else []) + list(attr.tensors)
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                files |= external_files(sub)
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            files |= {e.value for e in t.external_data if e.key == "location"}
    return files


def tensorrt_missing(reason: str, kept: Path, finish_command: str) -> MissingDependency:
    """The one-paragraph error of a TensorRT build that stopped after lowering."""
    return MissingDependency(
        f"Expected TensorRT ≥ 10 (the Python module 'tensorrt', with cuda-bindings) and an NVIDIA GPU to build the "
        f"TensorRT engine, but {reason}. The export and lowering are done: the lowered ONNX is kept at '{kept}' "
        "(with its weights and the recorded dim ranges; copy the whole folder). On a Linux machine with an NVIDIA "
        "GPU, install TensorRT with pip install 'enginekit[trt]' (or use NVIDIA's TensorRT container) and finish "
        f"the build there with: {finish_command}"
    )
