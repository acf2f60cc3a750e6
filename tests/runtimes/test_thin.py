"""The runtime is thin: importing and running it never imports torch, transformers or the build side."""

import subprocess
import sys
import textwrap

from tests.conftest import ROOT

HEAVY = ("torch", "transformers", "exporter", "calibration", "onnxscript", "polygraphy")


def test_import_and_infer_without_torch(bert_bundle):
    code = textwrap.dedent(f"""
        import sys
        import runtimes
        from runtimes.samples import generate_feeds
        with runtimes.load({str(bert_bundle)!r}) as r:
            out = r.infer(generate_feeds(r.manifest.io, "opt"))
        assert out["last_hidden_state"].shape[0] == 4
        loaded = [m for m in {HEAVY!r} if m in sys.modules]
        print("HEAVY:", loaded)
        assert not loaded, loaded
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "HEAVY: []" in proc.stdout


def test_bare_import_is_cheap():
    code = "import sys, runtimes; print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnxruntime', 'torch')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
