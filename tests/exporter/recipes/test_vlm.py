"""Qwen2-VL → a VLM generation bundle: vision engine, decoder on inputs_embeds, embedding table, the
gate (vision embeddings + tokens vs transformers FP32 on real photos), refusals, the parity command."""

import json

import numpy as np
import pytest

from exporter.pipeline import BuildOptions, build
from exporter.source.shapes import parse_shapes
from runtimes.errors import UsageError
from tests.conftest import VLM_SHAPES


def test_vlm_bundle_layout_and_gate(vlm_bundle):
    m = json.loads((vlm_bundle / "manifest.json").read_text())
    gen = json.loads((vlm_bundle / "generation.json").read_text())
    assert m["source"]["task"] == "image-text-to-text" and m["source"]["image_size"] == [84, 56]
    assert set(gen["components"]) == {"prefill", "decode", "vision"}
    vision = gen["components"]["vision"]["io"]
    assert vision["inputs"][0]["shape"] == ["images", 24, 1176] and vision["outputs"][0]["shape"] == ["images", 6, 64]
    assert gen["vision"]["image_size"] == [84, 56] and gen["vision"]["max_images"] == 4
    prefill = {s["name"]: s["shape"] for s in gen["components"]["prefill"]["io"]["inputs"]}
    assert prefill == {"inputs_embeds": ["batch", "sequence", 64], "attention_mask": ["batch", "sequence"],
                       "position_ids": [3, "batch", "sequence"]}
    table = np.load(vlm_bundle / gen["embeddings"]["file"])
    assert table.shape == (320, 64) and "embed_tokens.npy" in m["files"]
    p = m["parity"]
    assert p["status"] == "passed" and p["worst"]["tokens"]["equal"] == 1.0
    assert p["worst"]["image_embeds"]["cosine"] > 0.99999 and p["worst"]["logits"]["rel_l2"] < 1e-5
    assert sum("identical for 32 steps" in n for n in p["notes"]) == 5  # 4 cases + the padded batch
    assert any(c.startswith("vision: 3 photos") for c in p["cases"])


def test_refusals(tiny_qwen2_vl_dir, tmp_path, vlm_bundle):
    import runtimes

    with pytest.raises(UsageError, match="load_generator"):
        runtimes.load(vlm_bundle)
    shapes = parse_shapes(VLM_SHAPES)
    with pytest.raises(UsageError, match="multiples of 28.*image_height=84"):
        build(f"hf:{tiny_qwen2_vl_dir}", BuildOptions(output=tmp_path / "odd", shapes=parse_shapes(
            VLM_SHAPES.replace("image_height=84", "image_height=90"))))
    other = tmp_path / "qwen3moe"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "qwen3_vl_moe"}))
    with pytest.raises(UsageError, match="Qwen3-VL-MoE.*mixture-of-experts"):
        build(f"hf:{other}", BuildOptions(output=tmp_path / "moe"))
    with pytest.raises(UsageError, match="int8.*model_type 'qwen2_vl' is not one ONNX Runtime GenAI's builder writes"):
        build(f"hf:{tiny_qwen2_vl_dir}", BuildOptions(output=tmp_path / "int8", precision="int8", shapes=shapes))
    with pytest.raises(UsageError, match="--generator genai.*'qwen2_vl' is not one"):
        build(f"hf:{tiny_qwen2_vl_dir}", BuildOptions(output=tmp_path / "genai", generator="genai", shapes=shapes))
    assert not any((tmp_path / n).exists() for n in ("int8", "moe", "genai"))


def test_parity_command_reruns_the_vlm_gate(vlm_bundle):
    from exporter.gate.recheck import check_bundle

    report = check_bundle(vlm_bundle, trust_recorded=True)
    assert report.passed and {o.name for c in report.cases for o in c.outputs} == {"image_embeds", "logits", "tokens"}
