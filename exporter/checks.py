"""`enginekit parity BUNDLE`: re-run a bundle's gate against its recorded (or another) reference."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import runtimes
from runtimes.manifest import Manifest

from .gate import gate_cases, run_gate
from .parity import ParityReport, TolerancePolicy
from .pipeline import Progress
from .report import write_html
from .sources import load_source, parse_source


def check_bundle(bundle: Path, *, reference: str | None = None, data: Path | None = None,
                 tolerances: list[str] | None = None, device: str | None = None, html: Path | None = None,
                 progress: Progress | None = None, seed: int = 0) -> ParityReport:
    """Gate `bundle` on the same shapes it was built for; the bundle itself is not modified."""
    say = progress or (lambda _m: None)
    if (Path(bundle) / "generation.json").is_file():  # issue 8: a causal LM's bundle, gated on tokens
        from .genparity import check_generation_bundle

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
        policy = TolerancePolicy.for_precision(precision, tolerances or [])
        say("Parity gate: reference vs engine")
        cases = gate_cases(manifest.io, data=data, tokenizer_dir=loaded.tokenizer_dir, seed=seed)
        report = run_gate(loaded.reference, runner.infer, cases, policy, precision,
                          on_case=lambda label: say(f"Parity gate: {label}"))
    finally:
        runner.close()
    if html:
        write_html(report, html, title=f"Parity: {manifest.name}",
                   context={"bundle": str(bundle), "reference": str(spec), "precision": precision})
    return report
