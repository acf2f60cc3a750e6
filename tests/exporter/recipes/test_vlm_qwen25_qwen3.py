"""Qwen2.5-VL (windowed vision attention) and Qwen3-VL (deepstack features, interleaved M-RoPE, an
interpolated position table) as VLM generation bundles: build and gate against transformers at fp32 and
int8/int4 weight-only (the decoder as ONE graph by ONNX Runtime GenAI's builder, recipes/vlm_genai.py) and
fp16 (enginekit's prefill and decode graphs: the builder's FP16 CPU decoder does not run), the runtime's
preprocessing, positions and deepstack merge without torch, the CLI's --image, and the refusal of image sizes
whose windows would be partial."""

import json

import numpy as np
import pytest

from exporter.pipeline import BuildOptions, build
from exporter.source.shapes import parse_shapes
from runtimes.errors import UsageError
from runtimes.generate import SamplingOptions, load_generator
from tests.conftest import QWEN3_VL_SHAPES, QWEN25_VL_SHAPES, run_cli

FAMILIES = {"qwen2_5_vl": ("tiny_qwen2_5_vl_dir", QWEN25_VL_SHAPES), "qwen3_vl": ("tiny_qwen3_vl_dir", QWEN3_VL_SHAPES)}


def _build(request, bundles, family: str, precision: str):
    fixture, shapes = FAMILIES[family]
    folder = request.getfixturevalue(fixture)
    out = bundles / f"{family}-{precision}"
    if (out / "manifest.json").is_file():
        return out
    return build(f"hf:{folder}", BuildOptions(output=out, precision=precision, shapes=parse_shapes(shapes))).bundle


@pytest.fixture(scope="module")
def qwen3_bundle(request, bundles):
    return _build(request, bundles, "qwen3_vl", "fp32")


@pytest.fixture(scope="module")
def qwen3(tiny_qwen3_vl_dir):
    import torch
    import transformers

    model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(str(tiny_qwen3_vl_dir), dtype=torch.float32)
    return (model.eval(), transformers.AutoTokenizer.from_pretrained(str(tiny_qwen3_vl_dir)),
            transformers.AutoImageProcessor.from_pretrained(str(tiny_qwen3_vl_dir)))


ONE_GRAPH = ("fp32", "int8", "int4")  # on the CPU: the builder's decoder (fp16 there: enginekit's two graphs)


def _check_bundle(bundle, family: str, precision: str) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    gen = json.loads((bundle / "generation.json").read_text())
    one = precision in ONE_GRAPH
    prefill = "decoder" if one else "prefill"
    assert m["source"]["model_type"] == family and gen["positions"] == "mrope"
    assert set(gen["components"]) == ({"decoder", "vision"} if one else {"prefill", "decode", "vision"})
    if one:  # one session for both steps: the weights once; GroupQueryAttention reads right-padded rows
        assert gen["stages"] == {"prefill": "decoder", "decode": "decoder"} and gen["padding"] == "right"
        decoder = m["precision"]["realised"]["decoder"]
        assert decoder["by"] == "onnxruntime-genai model builder" and decoder["precision"] == precision
        ops = m["target"]["options"]["generation"]["decoder"]["fusions"]["fused_ops"]
        assert ops["GroupQueryAttention"] == 3 if family == "qwen3_vl" else ops["GroupQueryAttention"] == 2
        assert (ops.get("MatMulNBits", 0) > 0) == (precision != "fp32")
        assert [f for f in m["target"]["engine_files"] if f.startswith("decoder/")] == [
            "decoder/model.onnx", "decoder/model.onnx.data"]
    vision_out = {o["name"]: o["shape"] for o in gen["components"]["vision"]["io"]["outputs"]}
    prefill_in = {i["name"]: i["shape"] for i in gen["components"][prefill]["io"]["inputs"]}
    if family == "qwen3_vl":
        assert gen["vision"]["deepstack"] == 2 and gen["vision"]["patch_size"] == 16
        assert vision_out == {"image_embeds": ["images", 6, 64], "deepstack_embeds": ["images", 2, 6, 64]}
        assert prefill_in["deepstack_embeds"] == [2, "batch", "sequence", 64]
    else:
        assert gen["vision"]["deepstack"] == 0 and vision_out == {"image_embeds": ["images", 8, 64]}
        assert "deepstack_embeds" not in prefill_in
    p = m["parity"]
    assert p["status"] == "passed", p
    if precision in ("int8", "int4"):  # weight-only: tokens may part at a tie, never elsewhere (the gate's rule)
        assert all("identical for 32 steps" in n or ": a tie)" in n for n in p["notes"] if n.startswith(("case", "batch")))
        assert p["worst"]["image_embeds"]["cosine"] > 0.99999  # the vision engine stays FP32 on the CPU
        return
    assert p["worst"]["tokens"]["equal"] == 1.0 and sum("identical for 32 steps" in n for n in p["notes"]) == 5
    floor = 0.99999 if precision == "fp32" else 0.9995
    assert p["worst"]["image_embeds"]["cosine"] > floor
    if family == "qwen3_vl":
        assert p["worst"]["deepstack_embeds"]["cosine"] > floor
    if precision == "fp16":  # lowered for real: every graph holds FP16 nodes
        realised = m["precision"]["realised"]
        assert all(realised[c]["nodes_by_dtype"].get("float16", 0) > 0 for c in ("prefill", "decode", "vision"))


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_build_and_gate(request, bundles, family, precision):
    _check_bundle(_build(request, bundles, family, precision), family, precision)


@pytest.mark.slow
@pytest.mark.parametrize(("family", "precision"), [("qwen2_5_vl", "int4"), ("qwen3_vl", "int8")])
def test_weight_only_decoder(request, bundles, family, precision):
    _check_bundle(_build(request, bundles, family, precision), family, precision)


def test_refusals_of_the_one_graph_decoder(tiny_qwen3_vl_dir, tmp_path):
    """What the builder's decoder cannot be: FP16 on the CPU (it does not run there), int4 with enginekit's graphs."""
    shapes = parse_shapes(QWEN3_VL_SHAPES)
    with pytest.raises(UsageError, match=r"builder's fp16 decoder does not run on --device cpu \(it does at fp32, int8, int4\)"):
        build(f"hf:{tiny_qwen3_vl_dir}", BuildOptions(output=tmp_path / "a", precision="fp16", generator="genai",
                                                     shapes=shapes))
    with pytest.raises(UsageError, match="int4.*--generator enginekit --exporter auto names enginekit's own graphs"):
        build(f"hf:{tiny_qwen3_vl_dir}", BuildOptions(output=tmp_path / "b", precision="int4", generator="enginekit",
                                                     shapes=shapes))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_partial_windows_are_refused(tiny_qwen2_5_vl_dir, tmp_path):
    with pytest.raises(UsageError, match=r"windows are all equal.*multiples of 56 px.*image_height=56 or 112"):
        build(f"hf:{tiny_qwen2_5_vl_dir}", BuildOptions(output=tmp_path / "odd", shapes=parse_shapes(
            QWEN25_VL_SHAPES.replace("image_height=112", "image_height=84"))))
    assert not (tmp_path / "odd").exists()


@pytest.mark.slow
def test_qwen3_preprocessing_and_positions_equal_transformers(qwen3, qwen3_bundle):
    import torch

    from exporter.gate.vision_language import gate_photos
    from runtimes.vlm import preprocess_image, rope_index

    model, _, processor = qwen3
    with load_generator(qwen3_bundle) as g:
        spec = g.vision
    photos = gate_photos(spec)
    want = processor(images=photos, return_tensors="np")
    got = np.concatenate([preprocess_image(im, spec) for im in photos])
    assert want["image_grid_thw"].tolist() == [[1, 6, 4]] * 3
    np.testing.assert_array_equal(got, want["pixel_values"])  # mean/std 0.5, patches of 16
    img, n = spec.image_token_id, spec.tokens_per_image
    ids = np.array([[50, spec.vision_start_token_id, *[img] * n, spec.vision_end_token_id, 60, 70]])
    mask = np.ones_like(ids)
    pos, _ = rope_index(ids, mask, img, [spec.grid], spec.merge_size)
    ref, _ = model.model.get_rope_index(torch.tensor(ids), mm_token_type_ids=torch.tensor((ids == img).astype(np.int32)),
                                        image_grid_thw=torch.tensor([spec.grid]), attention_mask=torch.tensor(mask))
    np.testing.assert_array_equal(pos, ref.numpy())


@pytest.mark.slow
def test_qwen3_generate_cli_and_deepstack(qwen3, qwen3_bundle, tmp_path):
    """The runtime's tokens equal transformers' generate() with an image; the deepstack input is not
    dead weight (zeroing it changes the logits); `enginekit generate --image` on a file."""
    from PIL import Image

    from exporter.gate.tokens import reference_generate
    from exporter.gate.vision_language import gate_photos, reference_inputs

    model, tok, processor = qwen3
    with load_generator(qwen3_bundle) as g:
        spec = g.vision
        photo = gate_photos(spec)[1]
        ids, extra = reference_inputs("<image>Describe this image.", [photo], tok, processor, model, spec)
        want, _ = reference_generate(model, ids, 16, extra)
        opts = SamplingOptions(max_new_tokens=16, stop_token_ids=[])
        got = g.generate("<image>Describe this image.", opts, images=[photo])
        assert got.prompt_tokens == ids and got.tokens == want
        enc = g.encode_images_all([photo])
        one = SamplingOptions(max_new_tokens=1, stop_token_ids=[])
        full = g.generate_ids([ids], one, record_logits=True, **enc)[0].logits[0]
        zeroed = g.generate_ids([ids], one, record_logits=True, image_embeds=enc["image_embeds"],
                                deepstack_embeds=np.zeros_like(enc["deepstack_embeds"]))[0].logits[0]
        assert np.abs(full - zeroed).max() > 1e-3
        with pytest.raises(UsageError, match="deepstack_embeds"):
            g.generate_ids([ids], one, image_embeds=enc["image_embeds"])
    Image.fromarray(photo).save(tmp_path / "cat.png")
    ok = run_cli("generate", str(qwen3_bundle), "-p", "<image>Describe this image.", "--image", str(tmp_path / "cat.png"),
                 "-n", "16", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)[0]["text"] == tok.decode(want, skip_special_tokens=True)


@pytest.mark.slow
def test_qwen3_runtime_imports_no_torch(qwen3_bundle):
    from tests.runtimes.test_vlm import runs_without_torch

    runs_without_torch(qwen3_bundle, (96, 64))  # the deepstack merge included


@pytest.mark.slow
def test_one_graph_cache_and_binding_reused_across_calls(qwen3_bundle):
    """The one-graph decoder keeps its cache buffers and their io_binding between generate calls while they fit
    (runtimes/decoding.py, _OneGraphSteps): calls of other batch sizes and lengths on one generator give the logits
    and tokens a fresh generator gives each call, including a shorter call after a longer one (reused buffers
    holding the longer call's stale rows) and a batch call after single rows (new buffers, a new binding)."""
    from exporter.gate.vision_language import gate_photos

    with load_generator(qwen3_bundle) as g:
        spec = g.vision
        photos = gate_photos(spec)
        image = [spec.vision_start_token_id, *[spec.image_token_id] * spec.tokens_per_image, spec.vision_end_token_id]
        calls = [([[*image, 20, 21, 22, 23, 24, 25]], [[photos[0]]], 12),
                 ([[30, 31, 32]], [[]], 4),
                 ([[*image, 40, 41], [50, 51, 52, 53, 54, 55, 56, 57]], [[photos[1]], []], 9),
                 ([[*image, 60]], [[photos[2]]], 6)]
        for prompts, images, n in calls:
            opts = SamplingOptions(max_new_tokens=n, stop_token_ids=[])
            got = g.generate_ids(prompts, opts, images=images, record_logits=True)
            with load_generator(qwen3_bundle, verify=False) as fresh:
                want = fresh.generate_ids(prompts, opts, images=images, record_logits=True)
            for a, b in zip(got, want):
                assert a.tokens == b.tokens and len(a.tokens) == n
                np.testing.assert_array_equal(np.stack(a.logits), np.stack(b.logits))


def test_cache_length_buckets():
    """The one-graph cache is sized in powers of two from 256, capped at the engine's length (runtimes/onegraph.py):
    calls of similar lengths share buffers and their captured CUDA graph."""
    from runtimes.onegraph import cache_length

    assert [cache_length(n, 4096) for n in (1, 230, 256, 257, 294, 1000, 4000, 5000)] == [
        256, 256, 256, 512, 512, 1024, 4096, 4096]
    assert cache_length(300, 320) == 320


@pytest.mark.slow
def test_cuda_graph_refused_off_cuda(qwen3_bundle):
    with pytest.raises(UsageError, match="cuda_graph=True only for a one-graph decoder on CUDA"):
        load_generator(qwen3_bundle, cuda_graph=True)
    with load_generator(qwen3_bundle) as g:  # the default: no capture on the CPU
        assert not g.cuda_graph and g.cuda_graph_error is None


def _calls(spec, photos):
    image = [spec.vision_start_token_id, *[spec.image_token_id] * spec.tokens_per_image, spec.vision_end_token_id]
    return [([[*image, 20, 21, 22, 23, 24, 25]], [[photos[0]]], 24),
            ([[30, 31, 32]], [[]], 8),  # the same buffers and graph, a shorter call
            ([[*image, 40, 41], [50, 51, 52, 53, 54, 55, 56, 57]], [[photos[1]], []], 16),  # batch 2: a new graph
            ([[*image, 60]], [[photos[2]]], 300)]  # past 256 positions: new buffers, a new graph


@pytest.mark.gpu
def test_cuda_graph_decode_equals_the_uncaptured_loop(tiny_qwen3_vl_dir, tmp_path):
    """On a GPU: a BF16 one-graph Qwen3-VL decoder opened for capture (the default on CUDA) passes its gate, and its
    captured decode steps give the uncaptured loop's tokens and logits bit for bit over calls that reuse a graph,
    change the batch size and outgrow the buffers."""
    from exporter.gate.vision_language import gate_photos

    res = build(f"hf:{tiny_qwen3_vl_dir}", BuildOptions(output=tmp_path / "bf16", device="cuda", precision="bf16",
                                                        shapes=parse_shapes(QWEN3_VL_SHAPES.replace(":256", ":1024"))))
    assert res.parity.status == "passed", res.parity.failures()
    with load_generator(res.bundle, cuda_graph=True) as g, load_generator(res.bundle, cuda_graph=False) as plain:
        assert g.cuda_graph and not plain.cuda_graph
        for prompts, images, n in _calls(g.vision, gate_photos(g.vision)):
            opts = SamplingOptions(max_new_tokens=n, stop_token_ids=[])
            got = g.generate_ids(prompts, opts, images=images, record_logits=True)
            want = plain.generate_ids(prompts, opts, images=images, record_logits=True)
            for a, b in zip(got, want):
                assert a.tokens == b.tokens and len(a.tokens) == n
                np.testing.assert_array_equal(np.stack(a.logits), np.stack(b.logits))
        assert g._one.graph_id == 3  # (1, 256), (2, 256), (1, 512)
