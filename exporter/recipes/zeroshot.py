"""CLIP as two engines: the image tower and the text tower, each with its projection head, in one
zero-shot bundle (layout and runtime: runtimes/zeroshot.py).

Why two engines and not one graph of CLIPModel: a service embeds its prompts once and then only
images (or indexes images once and then only queries), so each tower runs alone, at its own batch
size; the similarity is a [N, D] × [D, P] product that needs no engine. Each tower is built,
lowered and gated by the ordinary pipeline (`hf:DIR#image-embedding`, `hf:DIR#text-embedding`, which
load CLIPVisionModelWithProjection / CLIPTextModelWithProjection from the CLIP folder), so each is a
complete bundle that `enginekit parity`, `bench`, `serve` and `triton` take as it is. Then the pair
is gated once more as the whole model, against transformers' CLIPModel: per-output metrics on the
logits and embeddings, plus the zero-shot check (ranking of the prompts per image,
exporter/gate/task.py).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from exporter.bundle.assemble import BuildResult, finish_bundle, staging_for
from exporter.export.memory import check_memory
from exporter.gate.cases import gate_cases, not_runnable_here, run_gate
from exporter.gate.parity import ParityReport
from exporter.gate.task import ZERO_SHOT, check_tolerance_outputs, gate_policy, tolerance_output
from exporter.options import build_command
from exporter.recipes.plain import build_plain
from exporter.source.loading import load_source, prepare_dims
from exporter.source.spec import SourceSpec
from exporter.source.towers import PART_TASK
from exporter.timing import Progress
from runtimes._version import __version__
from runtimes.errors import IncompatibleEngine, MissingDependency, UsageError
from runtimes.manifest import DimRange, Manifest, Target, TensorSpec, file_sha256
from runtimes.zeroshot import BACKEND, ROLES

# The pair's outputs (CLIPModel's, as the zero-shot gate compares them); ROLES maps each tower to its own.
OUTPUTS = ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds")


def _routed(value: Any, role: str) -> Any:
    """The part of --data/--calib a tower takes: images (a folder) feed the image tower, texts
    (.txt/.jsonl) the text tower; 'random[:N]' both; several comma-separated, each to its tower."""
    if value is None:
        return None
    text = str(value)
    if text.startswith("random"):
        return value
    for item in text.split(","):
        p = Path(item.strip())
        kind = "text" if p.suffix in (".txt", ".jsonl") else "image" if p.is_dir() and not any(p.glob("*.npz")) else None
        if kind == role:
            return type(value)(item.strip()) if isinstance(value, Path) else item.strip()
    return None


def _part_shapes(shapes: dict[str, DimRange], role: str) -> dict[str, DimRange]:
    batch = shapes.get(f"{role}_batch", shapes.get("batch"))
    out = {"batch": batch} if batch else {}
    if role == "text" and "sequence" in shapes:
        out["sequence"] = shapes["sequence"]
    return out


def _part_dynamic(dynamic: list[str] | None, role: str) -> list[str] | None:
    if dynamic is None:
        return None
    names = {"batch": "batch", f"{role}_batch": "batch", "sequence": "sequence"}
    return sorted({names[d] for d in dynamic if d in names})


def build_dual_encoder(spec: SourceSpec, source_text: str, options: Any, output: Path, staging: Path,
                       say: Progress) -> BuildResult:
    """`enginekit build hf:CLIP`: both towers (each built and gated by the plain recipe), then the
    zero-shot gate of the pair against CLIPModel."""
    if options.precision.quantized and options.calib and not str(options.calib).startswith("random"):
        missing = [r for r in ROLES if _routed(options.calib, r) is None]
        if missing:
            raise UsageError(
                f"Expected calibration data for both CLIP towers, found none for the {' and '.join(missing)} "
                f"tower in --calib '{options.calib}'. Give a folder of images and a .txt of prompts, comma-separated: "
                "--calib photos/,prompts.txt."
            )
    check_tolerance_outputs(options.tolerances, OUTPUTS, checks=[ZERO_SHOT])
    parts: dict[str, Any] = {}
    for role in ROLES:
        # A tower's gate takes the tolerances for every output and for its own; the rest are the pair's.
        mine = [t for t in options.tolerances if tolerance_output(t) in (None, ROLES[role])]
        part_opts = replace(options, output=staging / role, force=False, shapes=_part_shapes(options.shapes, role),
                            dynamic=_part_dynamic(options.dynamic, role),
                            data=_routed(options.data, role), calib=_routed(options.calib, role), tolerances=mine)
        tower = SourceSpec("hf", spec.location, PART_TASK[role])
        with staging_for(staging / role) as part_staging:
            parts[role] = build_plain(tower, str(tower), part_opts, staging / role, part_staging,
                                      lambda msg, role=role: say(f"{role} tower: {msg}"))
    return _assemble(spec, source_text, options, output, staging, parts, say)


def _assemble(spec: SourceSpec, source_text: str, options: Any, output: Path, staging: Path, parts: dict[str, Any],
              say: Progress) -> BuildResult:
    say("Zero-shot gate: loading CLIPModel as the reference")
    whole = load_source(SourceSpec("hf", spec.location, None))
    image, text = parts["image"].manifest, parts["text"].manifest
    dims = {"image_batch": image.io.dims["batch"], "text_batch": text.io.dims["batch"],
            **{k: v for k, v in text.io.dims.items() if k != "batch"}}
    whole.io = prepare_dims(whole, dims, None)
    check_memory(whole.io, options.memory_limit)
    command = build_command(source_text, options, output, {k: v for k, v in dims.items() if k != "batch"})
    for role in ROLES:
        part = Manifest.read(staging / role)
        part.name = f"{output.name}-{role}"  # distinct model names when both towers are served
        part.build_command = command  # a tower is rebuilt with its pair: its own command names the staging folder
        part.write(staging / role)
    out_shapes = {"logits_per_image": ("image_batch", "text_batch"), "logits_per_text": ("text_batch", "image_batch"),
                  "text_embeds": ("text_batch", text.io.outputs[0].shape[-1]),
                  "image_embeds": ("image_batch", image.io.outputs[0].shape[-1])}
    io = replace(whole.io, outputs=[TensorSpec(n, "float32", out_shapes[n]) for n in whole.module.output_names])
    logit_scale = float(whole.hf_model.logit_scale.detach().exp())
    manifest = Manifest(
        name=output.name,
        source={"spec": str(SourceSpec("hf", spec.location, spec.task)), "kind": "hf", "exporter": "per tower",
                **whole.info, "logit_scale": logit_scale},
        io=io,
        precision={"requested": options.precision, "parts": {r: p.manifest.precision for r, p in parts.items()}},
        target=Target(backend=BACKEND, device=options.device, engine_files=[],
                      options={"parts": {r: r for r in ROLES}, "logit_scale": logit_scale},
                      versions=dict(image.target.versions), gpu=image.target.gpu),
        build_command=command,
        enginekit_version=__version__,
        files={f"{r}/manifest.json": file_sha256(staging / r / "manifest.json") for r in ROLES},
    )
    report = _zero_shot_gate(whole, manifest, staging, options, say)

    def failure(failures: str, rejected: Path) -> str:
        return (f"Expected the two {options.precision} CLIP engines to compute what CLIPModel computes, but the "
                f"zero-shot gate failed: {failures}. Each tower passed its own gate; nothing was written to "
                f"'{output}'; the rejected bundle is in '{rejected}' (open report.html). Loosen a tolerance with "
                "--tolerance zero-shot:METRIC=VALUE only if the difference is acceptable.")

    timings = {f"{r}_{k}": v for r, p in parts.items() for k, v in p.timings.items()}
    return finish_bundle(staging, output, manifest, report, title=f"Zero-shot parity: {manifest.name}",
                         context={"source": manifest.source["spec"], "precision": options.precision,
                                  "enginekit": __version__}, timings=timings, failure=failure)


def _zero_shot_gate(whole: Any, manifest: Manifest, staging: Path, options: Any, say: Progress) -> ParityReport:
    io = manifest.io
    policy, task = gate_policy(options.precision, options.tolerances, manifest.source, [o.name for o in io.outputs])
    if options.skip_parity:
        return ParityReport(options.precision, policy, notes=["parity not checked: --skip-parity"]).finish()
    from runtimes import open_runner

    try:
        runner = open_runner(staging, manifest, device=options.device)
    except (IncompatibleEngine, MissingDependency) as exc:
        reason = not_runnable_here(exc, options.device, options.precision)
        return ParityReport(options.precision, policy, notes=[
            f"parity not checked: the engines cannot run here ({reason})"]).finish(engine_checked=False)
    cases = gate_cases(io, data=options.data if _routed(options.data, "image") is None and
                       _routed(options.data, "text") is None else None, seed=options.seed)
    with runner:
        report = run_gate(whole.reference, runner.infer, cases, policy, options.precision, task=task,
                          on_case=lambda label: say(f"Zero-shot gate: {label}"))
    if options.precision.mixed and not options.device.gpu:
        report.notes.append("the CPU engines compute FP16 nodes in FP32; each tower's own gate (image/parity.json, "
                            "text/parity.json) also ran its lowered graph with FP16 storage (emulated)")
    return report
