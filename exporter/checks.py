"""`enginekit parity BUNDLE`: re-run a bundle's gate against its recorded (or another) reference."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import runtimes
from runtimes.manifest import Manifest

from . import detect
from .gate import gate_cases, run_gate
from .loading import load_source
from .parity import ParityReport
from .report import write_html
from .sources import parse_source
from .taskparity import gate_policy
from .timing import Progress


def check_bundle(bundle: Path, *, reference: str | None = None, data: Path | None = None,
                 tolerances: list[str] | None = None, device: str | None = None, html: Path | None = None,
                 progress: Progress | None = None, seed: int = 0) -> ParityReport:
    """Gate `bundle` on the same shapes it was built for; the bundle itself is not modified."""
    say = progress or (lambda _m: None)
    if (Path(bundle) / "generation.json").is_file():  # issue 8: a causal LM's bundle, gated on tokens
        from .generation import check_generation_bundle

        return check_generation_bundle(bundle, reference=reference, data=data, tolerances=tolerances, device=device,
                                       progress=say)
    manifest = Manifest.read(bundle)
    say("Loading engine")
    runner = runtimes.load(bundle, device=device)  # refuses an altered or unrunnable bundle first
    try:
        spec = parse_source(reference or manifest.source["spec"])
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
                                                       getattr(runner, "device", "cpu"))
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
                   context={"bundle": str(bundle), "reference": str(spec), "precision": precision})
    return report
