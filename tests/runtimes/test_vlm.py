"""The VLM runtime (no torch): preprocessing and M-RoPE against transformers, generation with images
against transformers' generate(), prompt markers, refusals, the CLI's --image, and its imports."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from runtimes.errors import InvalidInput, UsageError
from runtimes.generate import SamplingOptions, load_generator
from runtimes.vlm import VisionLanguageGenerator, VisionSpec, expand_prompt, preprocess_image, rope_index
from tests.conftest import ROOT, run_cli


@pytest.fixture(scope="module")
def tiny_vl(tiny_qwen2_vl_dir):
    import torch
    import transformers

    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(str(tiny_qwen2_vl_dir), dtype=torch.float32)
    return (model.eval(), transformers.AutoTokenizer.from_pretrained(str(tiny_qwen2_vl_dir)),
            transformers.AutoImageProcessor.from_pretrained(str(tiny_qwen2_vl_dir)))


@pytest.fixture(scope="module")
def spec(vlm_bundle) -> VisionSpec:
    with load_generator(vlm_bundle) as g:
        return g.vision


@pytest.fixture(scope="module")
def photos(spec):
    from exporter.gate.vision_language import gate_photos

    return gate_photos(spec)


def test_preprocessing_equals_transformers(tiny_vl, spec, photos):
    from PIL import Image

    _, _, processor = tiny_vl
    noise = np.random.default_rng(0).integers(0, 256, (*spec.image_size, 3), dtype=np.uint8)
    gray = photos[1].mean(axis=2).astype(np.uint8)
    images = [*photos, noise, gray]
    # grayscale: transformers takes it as a PIL "L" image (its convert_rgb), the runtime as HxW
    want = processor(images=[*images[:-1], Image.fromarray(gray)], return_tensors="np")
    got = np.concatenate([preprocess_image(im, spec) for im in images])
    assert want["image_grid_thw"].tolist() == [list(spec.grid)] * len(images) == [[1, 6, 4]] * 5
    assert got.shape == want["pixel_values"].shape == (5 * 24, 3 * 2 * 14 * 14)
    np.testing.assert_array_equal(got, want["pixel_values"])  # bit for bit: the same float64→float32 steps


def test_rope_index_equals_transformers(tiny_vl, spec):
    import torch

    model, _, _ = tiny_vl
    img, start, end = spec.image_token_id, spec.vision_start_token_id, spec.vision_end_token_id
    n = spec.tokens_per_image
    one = [50, 60, start, *[img] * n, end, 70, 80]  # ids below 7 are the special tokens
    two = [90, start, *[img] * n, end, 100, start, *[img] * n, end, 110]
    width = len(two)
    ids = np.zeros((2, width), np.int64)
    mask = np.zeros((2, width), np.int64)
    ids[0, width - len(one):], mask[0, width - len(one):] = one, 1  # left-padded
    ids[1], mask[1] = two, 1
    # the bundle's non-square grid (6x4 patches → 3x2 tokens: h and w positions differ)
    grids = [(1, 6, 4), (1, 6, 4), (1, 6, 4)]
    got, deltas = rope_index(ids, mask, img, grids, spec.merge_size)
    want, want_deltas = model.model.get_rope_index(
        torch.tensor(ids), mm_token_type_ids=torch.tensor((ids == img).astype(np.int32)),
        image_grid_thw=torch.tensor(grids), attention_mask=torch.tensor(mask))
    np.testing.assert_array_equal(got, want.numpy())
    np.testing.assert_array_equal(deltas, want_deltas.numpy()[:, 0])
    assert not np.array_equal(got[0], got[1])  # image tokens: h and w rows differ (not 1-D positions)
    text = rope_index(ids[:1, -3:], mask[:1, -3:], img, [], 2)[0]
    np.testing.assert_array_equal(text, np.broadcast_to(np.arange(3), (3, 1, 3)))


def _reference(tiny_vl, spec, prompt, images, n):
    from exporter.gate.tokens import reference_generate
    from exporter.gate.vision_language import reference_inputs

    model, tok, processor = tiny_vl
    ids, extra = reference_inputs(prompt, images, tok, processor, model, spec)
    tokens, _ = reference_generate(model, ids, n, extra)
    return ids, tokens, tok.decode(tokens, skip_special_tokens=True)


def test_generate_with_images_equals_transformers(vlm_bundle, tiny_vl, spec, photos):
    opts = SamplingOptions(max_new_tokens=24, stop_token_ids=[])
    with load_generator(vlm_bundle) as g:
        assert isinstance(g, VisionLanguageGenerator)
        for prompt, images in [("<image>Describe this image.", photos[1:2]), ("Compare <image> and <image>.", photos[:2]),
                               ("The capital of France is", [])]:
            ids, want, text = _reference(tiny_vl, spec, prompt, images, 24)
            got = g.generate(prompt, opts, images=images)
            assert got.prompt_tokens == ids  # the runtime's own prompt building = the processor's
            assert got.tokens == want and got.text == text
        # a chat template's output (<|image_pad|> already in place) expands the same way
        chat = "<|vision_start|><|image_pad|><|vision_end|>Describe this image."
        assert g.generate(chat, opts, images=photos[1:2]).tokens == g.generate("<image>Describe this image.", opts,
                                                                                images=photos[1:2]).tokens


def test_batch_and_streaming(vlm_bundle, photos):
    opts = SamplingOptions(max_new_tokens=10, stop_token_ids=[])
    with load_generator(vlm_bundle) as g:
        prompts, images = ["<image>Describe this image.", "Hi", "A <image> B <image>"], [photos[:1], [], photos[1:]]
        batch = g.generate_batch(prompts, opts, images=images)
        single = [g.generate(p, opts, images=im) for p, im in zip(prompts, images)]
        assert [r.tokens for r in batch] == [r.tokens for r in single]
        pieces: list[str] = []
        streamed = g.generate(prompts[0], opts, images=images[0], on_text=pieces.append)
        assert "".join(pieces) == streamed.text.rstrip("\ufffd") and streamed.tokens == single[0].tokens


def test_bad_inputs_get_clear_errors(vlm_bundle, photos, spec):
    with load_generator(vlm_bundle) as g:
        with pytest.raises(InvalidInput, match=r"Expected a 84x56 image.*found 56x84.*--resize"):
            g.generate("<image>Hi", images=[np.zeros((56, 84, 3), np.uint8)])
        with pytest.raises(InvalidInput, match="uint8 RGB"):
            g.generate("<image>Hi", images=[np.zeros((84, 56, 4), np.uint8)])
        with pytest.raises(InvalidInput, match="uint8 RGB"):
            g.generate("<image>Hi", images=[np.zeros((84, 56, 3), np.float32)])
        with pytest.raises(UsageError, match="one <image> in the prompt per image, found 2 for 1"):
            g.generate("<image> and <image>", images=photos[:1])
        with pytest.raises(UsageError, match="image_pad"):
            g.generate_ids([[spec.image_token_id] * 3], SamplingOptions())  # placeholders without images
    assert expand_prompt("x", 2, spec).count(spec.image_token) == 2 * spec.tokens_per_image


def test_cli_generate_with_image_files(vlm_bundle, tiny_vl, spec, photos, tmp_path):
    from PIL import Image

    Image.fromarray(photos[2]).save(tmp_path / "coffee.png")
    Image.fromarray(photos[2]).resize((112, 168)).save(tmp_path / "big.png")
    _, _, text = _reference(tiny_vl, spec, "<image>Describe this image.", photos[2:3], 12)
    ok = run_cli("generate", str(vlm_bundle), "-p", "<image>Describe this image.", "--image", str(tmp_path / "coffee.png"),
                 "-n", "12", "--json")
    assert ok.returncode == 0, ok.stderr
    import json

    assert json.loads(ok.stdout)[0]["text"] == text
    bad = run_cli("generate", str(vlm_bundle), "-p", "<image>Hi", "--image", str(tmp_path / "big.png"), "-n", "4")
    assert bad.returncode != 0 and "Expected a 84x56 image" in bad.stderr and "Traceback" not in bad.stderr
    resized = run_cli("generate", str(vlm_bundle), "-p", "<image>Hi", "--image", str(tmp_path / "big.png"), "-n", "4",
                      "--resize")
    assert resized.returncode == 0, resized.stderr


def runs_without_torch(bundle, size: tuple[int, int]) -> None:
    """Generate with one image in a fresh interpreter: no torch, transformers, exporter, calibration or PIL."""
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        from runtimes.generate import SamplingOptions, load_generator
        with load_generator({str(bundle)!r}) as g:
            out = g.generate("<image>Describe.", SamplingOptions(max_new_tokens=4), images=[np.zeros(({size[0]}, {size[1]}, 3), np.uint8)])
        heavy = [m for m in ("torch", "transformers", "exporter", "calibration", "PIL") if m in sys.modules]
        print("HEAVY:", heavy, type(g).__name__, len(out.tokens))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY: [] VisionLanguageGenerator" in proc.stdout


def test_vlm_runtime_imports_no_torch(vlm_bundle):
    runs_without_torch(vlm_bundle, (84, 56))


def test_chat_content_puts_the_images_in_the_users_turn():
    from runtimes.chat import message_parts
    from runtimes.vlm import chat_content

    assert chat_content("Hi", 0) == "Hi"
    assert chat_content("Describe.", 2) == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Describe."}]
    assert chat_content("A <image> B", 1) == [{"type": "text", "text": "A "}, {"type": "image"}, {"type": "text", "text": " B"}]
    url = "data:image/png;base64,AAAA"
    parts, urls = message_parts([{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": url}}])
    assert parts == [{"type": "text", "text": "What is it?"}, {"type": "image"}] and urls == [url]
    assert message_parts("plain") == ("plain", [])
    with pytest.raises(UsageError, match=r"data:image/png;base64.*part 0"):
        message_parts([{"type": "audio", "audio": "x"}])


def _data_uri(array) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_image_urls_decode_resize_and_refuse():
    from runtimes.serve.images import decode_image_url
    from runtimes.serve.openai_protocol import ApiError

    photo = np.random.default_rng(0).integers(0, 255, (84, 56, 3), dtype=np.uint8)
    assert np.array_equal(decode_image_url(_data_uri(photo), (84, 56), "p"), photo)  # PNG is lossless
    assert decode_image_url(_data_uri(photo), (42, 28), "p").shape == (42, 28, 3)  # resized to the bundle's size
    for url, why in [("https://example.com/cat.png", "reads nothing outside"), ("data:image/png,abc", "without ';base64'"),
                     ("data:image/png;base64,bm90IGFuIGltYWdl", "cannot decode")]:
        with pytest.raises(ApiError, match=why) as exc:
            decode_image_url(url, (84, 56), "messages (image 0)")
        assert exc.value.status == 400 and exc.value.param == "messages (image 0)"


def test_cli_chat_places_the_images_inside_the_users_turn(vlm_bundle, spec, photos, tmp_path):
    import json

    from PIL import Image

    Image.fromarray(photos[0]).save(tmp_path / "a.png")
    out = run_cli("generate", str(vlm_bundle), "-p", "Describe this image.", "--image", str(tmp_path / "a.png"), "-n", "6",
                  "--chat", "--json")
    assert out.returncode == 0, out.stderr
    prompt = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n<|im_start|>assistant\n"
    with load_generator(vlm_bundle) as g:  # the tiny Qwen2-VL's template (tests/models/vlm.py), written out
        want = g.generate(prompt, SamplingOptions(max_new_tokens=6, add_special_tokens=False), images=photos[:1])
    assert json.loads(out.stdout)[0]["tokens"] == want.tokens


@pytest.mark.slow
def test_serve_a_vlm_with_image_url_parts(vlm_bundle, spec, photos):
    """`enginekit serve` of a VLM bundle: an OpenAI chat request with an image_url data: URI answers what the
    runtime answers for the same image and chat template; bad image URLs get OpenAI's error JSON (400)."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from bench.loadtest import serve_process
    from tests.runtimes.test_serve_http import ENGINEKIT

    question = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_uri(photos[1])}},
                                             {"type": "text", "text": "Describe this image."}]}]
    with load_generator(vlm_bundle) as g:
        prompt = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n<|im_start|>assistant\n"
        want = g.generate(prompt, SamplingOptions(max_new_tokens=8, temperature=0.0, add_special_tokens=False),
                          images=photos[1:2])
    with serve_process([ENGINEKIT, "serve", str(vlm_bundle), "--port", "0"], ready_timeout=120) as server:
        body = {"model": "qwen2-vl-gen", "messages": question, "max_tokens": 8, "temperature": 0}
        got = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
        assert got.status_code == 200, got.text
        assert got.json()["choices"][0]["message"]["content"] == want.text
        assert got.json()["usage"]["completion_tokens"] == len(want.tokens)
        far = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]
        bad = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "messages": far}, timeout=60)
        assert bad.status_code == 400 and "data: URI" in bad.json()["error"]["message"]
