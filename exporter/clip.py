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
exporter/taskparity.py).
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from runtimes._version import __version__
from runtimes.errors import IncompatibleEngine, MissingDependency, ParityError, UsageError
from runtimes.manifest import DimRange, IOSpec, Manifest, Target, file_sha256
from runtimes.samples import generate_feeds
from runtimes.zeroshot import BACKEND, ROLES

from .families import FAMILIES, family_for, resolve_inputs
from .sources import LoadedSource, SourceSpec, make_wrapper, model_name
from .staging import keep_rejected, new_staging, publish

TOWERS = {"image-embedding": ("image", "CLIPVisionModelWithProjection", "vision"),
          "text-embedding": ("text", "CLIPTextModelWithProjection", "text-encoder")}
PART_TASK = {role: task for task, (role, _, _) in TOWERS.items()}
DUAL_ENCODERS = ("clip",)  # model types whose towers transformers ships with projection heads


def load_tower(spec: SourceSpec, config: Any, folder: Path | None, task: str) -> LoadedSource:
    """One tower of a CLIP folder as a source: pixel_values → image_embeds, or input_ids and
    attention_mask → text_embeds (the projected, unnormalized embeddings)."""
    import copy
    import inspect

    import torch
    import transformers

    role, cls_name, family_name = TOWERS[task]
    if getattr(config, "model_type", None) not in DUAL_ENCODERS:
        raise UsageError(
            f"Expected a CLIP model folder for #{task}, found model_type '{getattr(config, 'model_type', None)}' in "
            f"'{spec.location}'. #image-embedding and #text-embedding load CLIP's towers; for other models pick "
            "another task, or leave #task out."
        )
    cls = getattr(transformers, cls_name)
    # The tower's own config, with the projection size that CLIPConfig keeps at its top level
    # (loaded alone, the tower config would default to 512 and refuse the checkpoint's head).
    tower_config = copy.deepcopy(config.vision_config if role == "image" else config.text_config)
    tower_config.projection_dim = config.projection_dim
    try:
        model = cls.from_pretrained(spec.location, config=tower_config, dtype=torch.float32).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # RuntimeError: weights that do not fit
        raise UsageError(
            f"Expected transformers' {cls_name} to load the {role} tower of '{spec.location}', but it failed: "
            f"{str(exc).strip().splitlines()[0][:300]}. Check the folder's weights."
        ) from None
    family = next(f for f in FAMILIES if f.name == family_name)
    accepted = set(inspect.signature(model.forward).parameters)
    inputs, dims, hints = resolve_inputs(family, config, accepted)
    io = IOSpec(inputs=inputs, outputs=[], dims=dims, values=hints)
    output = ROLES[role]

    def call(m: Any, kw: dict[str, Any]) -> Any:
        return {output: getattr(m(**kw, return_dict=True), output)}

    wrapper = make_wrapper(model, [s.name for s in inputs], call, generate_feeds(io, "opt"))
    return LoadedSource(spec, model_name(spec), io, module=wrapper, hf_model=model,
                        info={"task": task, "family": family_for(config).name, "model_type": config.model_type,
                              "class": cls_name, "tower": role},
                        tokenizer_dir=folder if role == "text" and folder is not None and _has_tokenizer(folder) else None)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


def is_dual_encoder(spec: SourceSpec) -> bool:
    """An hf: CLIP folder built without a task (or as zero-shot-image-classification): two engines."""
    if spec.kind != "hf" or spec.task not in (None, "zero-shot-image-classification"):
        return False
    config_file = Path(spec.location) / "config.json"
    if not config_file.is_file():
        return False
    import json

    try:
        return json.loads(config_file.read_text(encoding="utf-8")).get("model_type") in DUAL_ENCODERS
    except (OSError, ValueError):
        return False


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


def build_dual_encoder(source_text: str, spec: SourceSpec, options: Any, output: Path, say: Any) -> Any:
    """`enginekit build hf:CLIP`: both towers (each built and gated), then the zero-shot gate."""
    from .pipeline import BuildResult, build, build_command

    if options.precision in ("int8", "fp8") and options.calib and not str(options.calib).startswith("random"):
        missing = [r for r in ROLES if _routed(options.calib, r) is None]
        if missing:
            raise UsageError(
                f"Expected calibration data for both CLIP towers, found none for the {' and '.join(missing)} "
                f"tower in --calib '{options.calib}'. Give a folder of images and a .txt of prompts, comma-separated: "
                "--calib photos/,prompts.txt."
            )
    staging = new_staging(output)
    try:
        parts: dict[str, Any] = {}
        for role in ROLES:
            part_opts = replace(options, output=staging / role, force=False, shapes=_part_shapes(options.shapes, role),
                                dynamic=_part_dynamic(options.dynamic, role),
                                data=_routed(options.data, role), calib=_routed(options.calib, role),
                                tolerances=[t for t in options.tolerances if not t.startswith("zero-shot:")])
            parts[role] = build(f"hf:{spec.location}#{PART_TASK[role]}", part_opts,
                                lambda msg, role=role: say(f"{role} tower: {msg}"))
            part = Manifest.read(staging / role)
            part.name = f"{output.name}-{role}"  # distinct model names when both towers are served
            part.write(staging / role)
        return _assemble(spec, options, output, staging, parts, say, build_command, BuildResult)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _assemble(spec: SourceSpec, options: Any, output: Path, staging: Path, parts: dict[str, Any], say: Any,
              build_command: Any, result_cls: Any) -> Any:
    from .gate import gate_cases, run_gate
    from .parity import ParityReport, format_failures
    from .pipeline import prepare_dims
    from .report import write_html
    from .sources import load_source
    from .taskparity import gate_policy

    say("Zero-shot gate: loading CLIPModel as the reference")
    whole = load_source(SourceSpec("hf", spec.location, None))
    image, text = parts["image"].manifest, parts["text"].manifest
    dims = {"image_batch": image.io.dims["batch"], "text_batch": text.io.dims["batch"],
            **{k: v for k, v in text.io.dims.items() if k != "batch"}}
    whole.io = prepare_dims(whole, replace(options, shapes=dims, dynamic=None))
    out_shapes = {"logits_per_image": ("image_batch", "text_batch"), "logits_per_text": ("text_batch", "image_batch"),
                  "text_embeds": ("text_batch", text.io.outputs[0].shape[-1]),
                  "image_embeds": ("image_batch", image.io.outputs[0].shape[-1])}
    from runtimes.manifest import TensorSpec

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
        build_command=build_command(str(spec), options, output, {k: v for k, v in dims.items() if k != "batch"}),
        enginekit_version=__version__,
        files={f"{r}/manifest.json": file_sha256(staging / r / "manifest.json") for r in ROLES},
    )
    policy, task = gate_policy(options.precision, options.tolerances, manifest.source, [o.name for o in io.outputs])
    report = ParityReport(options.precision, policy, notes=["parity not checked: --skip-parity"]).finish()
    if not options.skip_parity:
        from runtimes import open_runner

        try:
            runner = open_runner(staging, manifest, device=options.device)
        except (IncompatibleEngine, MissingDependency) as exc:
            if options.device == "cpu" and options.precision != "fp8":
                raise
            report = ParityReport(options.precision, policy, notes=[
                f"parity not checked: the engines cannot run here ({str(exc).split('. ')[0]})"]).finish(engine_checked=False)
        else:
            cases = gate_cases(io, data=options.data if _routed(options.data, "image") is None and
                               _routed(options.data, "text") is None else None, seed=options.seed)
            with runner:
                report = run_gate(whole.reference, runner.infer, cases, policy, options.precision, task=task,
                                  on_case=lambda label: say(f"Zero-shot gate: {label}"))
            if options.precision in ("fp16", "bf16") and options.device == "cpu":
                report.notes.append("the CPU engines compute FP16 nodes in FP32; each tower's own gate (image/parity.json, "
                                    "text/parity.json) also ran its lowered graph with FP16 storage (emulated)")
    manifest.parity = report.summary()
    (staging / "parity.json").write_text(report.to_json() + "\n", encoding="utf-8")
    write_html(report, staging / "report.html", title=f"Zero-shot parity: {manifest.name}",
               context={"source": manifest.source["spec"], "precision": options.precision, "enginekit": __version__})
    manifest.write(staging)
    if report.status == "failed":
        rejected = keep_rejected(staging, output)
        raise ParityError(
            f"Expected the two {options.precision} CLIP engines to compute what CLIPModel computes, but the zero-shot "
            f"gate failed: {format_failures(report)}. Each tower passed its own gate; nothing was written to "
            f"'{output}'; the rejected bundle is in '{rejected}' (open report.html). Loosen a tolerance with "
            "--tolerance zero-shot:METRIC=VALUE only if the difference is acceptable."
        )
    publish(staging, output)
    timings = {f"{r}_{k}": v for r, p in parts.items() for k, v in p.timings.items()}
    return result_cls(output, manifest, report, timings)
