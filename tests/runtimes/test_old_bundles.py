"""Bundles written before the recipes redesign (tests/data/bundles/, built at commit 6162155) still
load with today's runtime and compute what the model computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import runtimes
from runtimes.choices import Kind
from runtimes.errors import UsageError
from runtimes.generate import SamplingOptions, load_generator
from runtimes.manifest import Manifest
from runtimes.samples import generate_feeds

OLD = Path(__file__).resolve().parents[1] / "data" / "bundles"


def test_an_old_engine_bundle_loads_and_matches_torch():
    import torch

    from tests.models.convnet import make

    bundle = OLD / "convnet-ort-fp32"
    assert Manifest.read(bundle).kind is Kind.ENGINE
    model, _ = make()
    with runtimes.load(bundle) as r:
        for batch in (1, 4):
            feeds = generate_feeds(r.manifest.io, {"batch": batch}, seed=batch)
            got = r.infer(feeds)
            with torch.inference_mode():
                want = model(torch.from_numpy(feeds["images"])).numpy()
            (name,) = got
            np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-5)


def test_an_old_generation_bundle_generates_transformers_tokens(tiny_qwen2_dir):
    import torch
    import transformers

    bundle = OLD / "qwen2-gen-ort-fp32"
    assert Manifest.read(bundle).kind is Kind.GENERATION
    with pytest.raises(UsageError, match="load_generator"):
        runtimes.load(bundle)
    # The same seeded tiny Qwen2 the bundle was built from (tests/models/causal.py).
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_dir), dtype=torch.float32).eval()
    prompt = [5, 6, 7, 8, 9]
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 5, dtype=torch.int64),
                         max_new_tokens=10, do_sample=False, pad_token_id=0)
    want = out[0, len(prompt):].tolist()
    with load_generator(bundle) as g:
        got = g.generate_ids([prompt], SamplingOptions(max_new_tokens=10, stop_token_ids=[]))[0].tokens
    assert got == want[: len(got)] and len(got) == 10
