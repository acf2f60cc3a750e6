"""CLIP as a zero-shot bundle: the towers, the zero-shot gate, parity/bench/triton/inspect on it."""

from pathlib import Path

import pytest

from exporter.bench import BenchOptions, run_bench
from exporter.gate.recheck import check_bundle
from exporter.inspection import inspect_path
from exporter.pipeline import BuildOptions, build
from exporter.recipes.zeroshot import _routed
from exporter.source.loading import load_source
from exporter.source.spec import parse_source
from exporter.triton import export_triton
from runtimes.errors import UsageError


def test_tower_sources_load_the_projection_heads(tiny_clip_dir):
    image = load_source(parse_source(f"hf:{tiny_clip_dir}#image-embedding"))
    text = load_source(parse_source(f"hf:{tiny_clip_dir}#text-embedding"))
    assert image.info["class"] == "CLIPVisionModelWithProjection" and image.module.output_names == ["image_embeds"]
    assert [s.name for s in text.io.inputs] == ["input_ids", "attention_mask"] and text.io.dims["sequence"].max == 16
    assert image.io.inputs[0].shape == ("batch", 3, 32, 32)


def test_zero_shot_gate_and_parity_command(clip_bundle):
    report = check_bundle(clip_bundle, trust_recorded=True)  # the whole model again, against transformers' CLIPModel
    assert report.passed and {c.checks[0].name for c in report.cases} == {"zero-shot"}
    assert report.worst_checks()["zero-shot"]["order"] == 1.0
    tower = check_bundle(clip_bundle / "image", trust_recorded=True)  # a tower against CLIPVisionModelWithProjection
    assert tower.passed and set(tower.worst()) == {"image_embeds"}


def test_bench_triton_and_inspect_on_a_zero_shot_bundle(clip_bundle, tmp_path):
    result = run_bench([clip_bundle], BenchOptions(batches=[2], baselines=["eager"], runs=3, warmup=1, min_seconds=0.0))
    assert {r["variant"] for r in result["rows"]} == {"torch eager fp32", "zero-shot-cpu fp32"}  # both towers + scores
    with pytest.raises(UsageError, match="one per tower.*enginekit triton .*image"):
        export_triton(clip_bundle, tmp_path / "repo")
    assert export_triton(clip_bundle / "text", tmp_path / "repo")["platform"] == "onnxruntime_onnx"
    assert set(inspect_path(clip_bundle)["file_bytes"]) == {"image/model.onnx", "text/model.onnx"}


def test_calibration_data_goes_to_the_tower_it_fits(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(b"")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    both = f"{photos},{prompts}"
    assert _routed(both, "image") == str(photos) and _routed(both, "text") == str(prompts)
    assert _routed("random:8", "text") == "random:8" and _routed(Path(prompts), "image") is None


def test_int8_clip_needs_data_for_both_towers(tiny_clip_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    with pytest.raises(UsageError, match="none for the image tower"):
        build(f"hf:{tiny_clip_dir}", BuildOptions(precision="int8", calib=str(prompts), output=tmp_path / "c"))


@pytest.mark.slow
def test_int8_clip_from_calibration(tiny_clip_dir, tmp_path):
    res = build(f"hf:{tiny_clip_dir}", BuildOptions(precision="int8", calib="random:16", output=tmp_path / "c8",
                                                    accuracy_budget="none", tolerances=["zero-shot:order=0.8,top1=0.8,prob_delta=0.2",
                                                                                        "cosine=0.9", "rel_l2=0.5", "argmax=0.5"]))
    assert res.parity.status == "passed" and res.manifest.precision["parts"]["image"]["realised"]["quantized_nodes"]
    assert (res.bundle / "image" / "manifest.json").is_file() and res.manifest.target.options["logit_scale"] > 1
