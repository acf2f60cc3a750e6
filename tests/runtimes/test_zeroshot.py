"""The zero-shot runtime: a CLIP bundle's two tower engines and the scores, without torch."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import runtimes
from runtimes.errors import IncompatibleEngine
from runtimes.samples import generate_feeds
from runtimes.zeroshot import ZeroShotRunner, softmax, zero_shot_logits
from tests.conftest import ROOT
from tests.runtimes.test_thin import HEAVY


def test_zero_shot_scores_without_torch(clip_bundle):
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        import runtimes
        from runtimes.samples import generate_feeds
        with runtimes.load({str(clip_bundle)!r}) as clip:
            f = generate_feeds(clip.manifest.io, {{"text_batch": 3, "image_batch": 2, "sequence": 16}}, seed=1)
            prompts = clip.encode_texts(f["input_ids"], f["attention_mask"])
            probs = clip.classify(f["pixel_values"], prompts)
            whole = clip.infer(f)
        assert probs.shape == (2, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
        assert np.allclose(np.log(probs) - np.log(probs)[:, :1], whole["logits_per_image"] - whole["logits_per_image"][:, :1], atol=1e-4)
        loaded = [m for m in {HEAVY!r} if m in sys.modules]
        print("HEAVY:", loaded)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "HEAVY: []" in proc.stdout


def test_each_tower_is_a_bundle_of_its_own(clip_bundle):
    with runtimes.load(clip_bundle) as clip:
        assert isinstance(clip, ZeroShotRunner) and clip.logit_scale == pytest.approx(np.exp(2.6592), rel=1e-3)
        f = generate_feeds(clip.manifest.io, "opt", seed=3)
        whole = clip.infer(f)
    with runtimes.load(clip_bundle / "image") as image, runtimes.load(clip_bundle / "text") as text:
        assert (image.manifest.name, text.manifest.name) == ("clip-image", "clip-text")
        img = image.infer({"pixel_values": f["pixel_values"]})["image_embeds"]
        txt = text.infer({"input_ids": f["input_ids"], "attention_mask": f["attention_mask"]})["text_embeds"]
    np.testing.assert_allclose(zero_shot_logits(img, txt, clip.logit_scale), whole["logits_per_image"], rtol=1e-5, atol=1e-5)
    assert softmax(whole["logits_per_image"]).shape == (4, 4)


def test_an_altered_tower_is_refused(clip_bundle, tmp_path):
    import shutil

    copy = tmp_path / "clip"
    shutil.copytree(clip_bundle, copy)
    m = json.loads((copy / "text" / "manifest.json").read_text())
    m["name"] = "renamed"
    (copy / "text" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IncompatibleEngine, match=r"text/manifest.json was modified"):
        runtimes.load(copy)
