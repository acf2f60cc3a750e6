"""`enginekit parity BUNDLE`: re-run a bundle's gate against its recorded (or another) reference."""

from __future__ import annotations

import re
import shlex
from dataclasses import replace
from pathlib import Path

import runtimes
from exporter.export import detector as detect
from exporter.gate.cases import gate_cases, run_gate
from exporter.gate.parity import ParityReport
from exporter.gate.report import write_html
from exporter.gate.task import check_tolerance_outputs, gate_policy
from exporter.gate.vision_language import VISION_OUTPUTS
from exporter.source.loading import load_source
from exporter.source.spec import parse_source
from exporter.timing import Progress
from runtimes.choices import Device, Kind, Precision
from runtimes.errors import UsageError
from runtimes.manifest import Manifest, verify_files

# A hub id (`hf:org/name`) or a timm model name: names a model, not a file or code on this machine.
_NAME_ONLY = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def reference_source(bundle: Path, manifest: Manifest, reference: str | None, trust_recorded: bool) -> str:
    """The reference to gate against: `reference` when the user names one; else the source the manifest
    records, but only when it is a model name (hf: hub id, timm:). A manifest is data: a recorded py:
    source is code to run and an hf:/onnx: folder is a path to read, so those need the user to name the
    reference on the command line (or to pass trust_recorded, `--trust-recorded-source`)."""
    if reference:
        return reference
    recorded = manifest.source.get("spec")
    if not isinstance(recorded, str) or not recorded:
        raise UsageError(f"Expected bundle '{bundle}' to record its source, found none. Name the reference: "
                         f"enginekit parity {shlex.quote(str(bundle))} --reference SOURCE.")
    kind, _, location = recorded.partition(":")
    location = location.partition("#")[0]
    if trust_recorded or kind == "timm" or (kind == "hf" and _NAME_ONLY.match(location) and not Path(location).exists()):
        return recorded
    what = "code to import and run" if kind == "py" else "a path on this machine to read"
    raise UsageError(
        f"Expected a reference named on the command line, because the source bundle '{bundle}' records "
        f"({recorded[:300]!r}) is {what}, and a manifest is data: enginekit does not run code or read a path "
        "because a bundle names it. Check that source, then name it yourself: enginekit parity "
        f"{shlex.quote(str(bundle))} --reference {shlex.quote(recorded[:300])} (or pass --trust-recorded-source)."
    )


def check_bundle(bundle: Path, *, reference: str | None = None, data: Path | None = None,
                 tolerances: list[str] | None = None, device: str | None = None, html: Path | None = None,
                 progress: Progress | None = None, seed: int = 0, trust_recorded: bool = False) -> ParityReport:
    """Gate `bundle` on the same shapes it was built for; the bundle itself is not modified.
    reference: the source to compare against (default: the recorded one when it is a model name;
    see reference_source); trust_recorded: also use a recorded py:/path source (default False)."""
    say = progress or (lambda _m: None)
    manifest = Manifest.read(bundle)
    verify_files(bundle, manifest)  # an altered bundle says so first, whatever the reference
    generation = manifest.kind in (Kind.GENERATION, Kind.VISION_LANGUAGE)
    # what the gate compares: the token gate's checks for generation bundles, else the engine's outputs
    compared = ["logits", "tokens", *(VISION_OUTPUTS if manifest.kind is Kind.VISION_LANGUAGE else ())]
    check_tolerance_outputs(tolerances or [], compared if generation else [o.name for o in manifest.io.outputs])
    source = reference_source(bundle, manifest, reference, trust_recorded)
    if generation:  # gated on tokens
        return check_generation_bundle(bundle, reference=source, data=data, tolerances=tolerances, device=device,
                                       progress=say)
    say("Loading engine")
    # verify_files above hashed every file; load() still checks confinement and that the engine can run here
    runner = runtimes.load(bundle, device=device, verify=False)
    try:
        spec = parse_source(source)
        say(f"Loading reference {spec}")
        loaded = load_source(spec)
        # The engine's io is the contract: same inputs, dims and value hints as at build time.
        loaded.io = replace(manifest.io)
        precision = manifest.precision.get("requested", "fp32")
        policy, task = gate_policy(precision, tolerances or [], manifest.source, [o.name for o in manifest.io.outputs])
        engine, notes = runner.infer, []
        det = detect.detection(manifest.source)
        if det and loaded.module is not None:
            detect.set_outputs(loaded, det.get("outputs", "nms"))  # the reference exports what the engine did
        hidden = detect.hidden_outputs(manifest.source)
        if hidden and task is not None:
            note = "raw head outputs not checked: a TensorRT plan keeps no graph to expose them from"
            if manifest.target.backend == "ort":
                engine, note = detect.with_raw_outputs(engine, bundle / manifest.target.engine_files[0], hidden,
                                                       getattr(runner, "device", "cpu"), getattr(runner, "cuda_options", None))
            if note:
                notes.append(note)
                task = replace(task, ungated=task.ungated | set(hidden))
        say("Parity gate: reference vs engine")
        cases = gate_cases(manifest.io, data=data, tokenizer_dir=loaded.tokenizer_dir, seed=seed)
        report = run_gate(loaded.reference, engine, cases, policy, precision,
                          on_case=lambda label: say(f"Parity gate: {label}"), task=task)
        report.notes = notes + report.notes
    finally:
        runner.close()
    if html:
        write_html(report, html, title=f"Parity: {manifest.name}",
                   context={"bundle": str(bundle), "reference": str(spec), "precision": precision},
                   precision=manifest.precision)
    return report


def check_generation_bundle(bundle: Path, *, reference: str | None = None, data: Path | None = None,
                            tolerances: list[str] | None = None, device: str | None = None,
                            progress: Progress | None = None) -> ParityReport:
    """`enginekit parity BUNDLE` for a generation bundle: the token gate again, on this machine
    (the way to check a BF16 CUDA bundle that was built where no GPU was). reference: as check_bundle's,
    with trust_recorded=False."""
    from types import SimpleNamespace

    from exporter.gate.tokens import parity_prompts, token_gate
    from exporter.source.causal import load_causal_lm
    from exporter.source.spec import parse_source

    say = progress or (lambda _m: None)
    manifest = Manifest.read(bundle)
    spec = parse_source(reference_source(bundle, manifest, reference, False))
    say(f"Loading reference {spec}")
    if manifest.source.get("family") == "vlm":
        from exporter.export.vlm import load_vlm
        from exporter.gate.vision_language import vlm_gate

        model, tokenizer, processor, _ = load_vlm(spec)
        options = SimpleNamespace(precision=Precision.parse(manifest.precision.get("requested", "fp32"), "the bundle's precision"),
                                  skip_parity=False, tolerances=list(tolerances or []),
                                  device=Device.parse(device or manifest.target.device, "--device"))
        return vlm_gate(model, tokenizer, processor, Path(bundle), options, say)
    model, tokenizer, _ = load_causal_lm(spec)
    dims = {k: v for k, v in manifest.io.dims.items()}
    dims.setdefault("sequence", manifest.io.dims["total_sequence"])
    prompts = parity_prompts(tokenizer, data, model.config, dims)
    options = SimpleNamespace(precision=Precision.parse(manifest.precision.get("requested", "fp32"), "the bundle's precision"),
                              tolerances=list(tolerances or []), skip_parity=False,
                              device=Device.parse(device or manifest.target.device, "--device"))
    return token_gate(model, tokenizer, Path(bundle), prompts, options, {}, say)
