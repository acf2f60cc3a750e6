"""Calibration data sources: images (HF processor config or explicit), random, the held-out split,
text truncation, and the bad inputs (empty folder, broken images, wrong shapes)."""

import json
import warnings

import numpy as np
import pytest

from calibration.data import DataWarning, check_fits, load_feeds, load_split
from calibration.images import ImageOptions
from runtimes.errors import DataError
from runtimes.manifest import DimRange, IOSpec, TensorSpec

PIX = IOSpec(inputs=[TensorSpec("pixel_values", "float32", ("batch", 3, 16, 16))], outputs=[],
             dims={"batch": DimRange(1, 4, 8)})
TEXT = IOSpec(
    inputs=[TensorSpec("input_ids", "int64", ("batch", "sequence")),
            TensorSpec("attention_mask", "int64", ("batch", "sequence")),
            TensorSpec("token_type_ids", "int64", ("batch", "sequence"))],
    outputs=[], dims={"batch": DimRange(1, 4, 16), "sequence": DimRange(1, 4, 6)},
)
IMAGENET = ImageOptions(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _images(folder, n=8, size=(40, 24)):
    from PIL import Image

    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def test_image_folder_with_explicit_preprocessing(tmp_path):
    folder = _images(tmp_path / "imgs", n=8)
    split = load_split(folder, PIX, image_options=IMAGENET, batch_size=4)
    assert split.kind == "images" and split.samples == (6, 2)  # every 4th image held out
    assert [f["pixel_values"].shape for f in split.calibration] == [(4, 3, 16, 16), (2, 3, 16, 16)]
    assert split.evaluation[0]["pixel_values"].dtype == np.float32
    assert split.preprocessing["from"] == "explicit options" and split.preprocessing["crop"] == [16, 16]
    # ImageNet normalization of uniform pixels: roughly centred
    assert abs(float(np.concatenate([f["pixel_values"] for f in split.calibration]).mean())) < 0.5
    assert len(split.sha256) == 64


def test_image_folder_with_hf_preprocessor_config(tmp_path):
    folder = _images(tmp_path / "imgs", n=4)
    model = tmp_path / "model"
    model.mkdir()
    (model / "preprocessor_config.json").write_text(json.dumps({
        "do_resize": True, "size": {"shortest_edge": 20}, "do_center_crop": True, "crop_size": {"height": 16, "width": 16},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "resample": 3}))
    feeds = load_feeds(folder, PIX, tokenizer_dir=model, batch_size=8)
    x = feeds[0]["pixel_values"]
    assert x.shape == (4, 3, 16, 16) and -1.0 <= x.min() and x.max() <= 1.0  # (p/255 - .5)/.5


def test_images_without_preprocessing_ask_for_it(tmp_path):
    folder = _images(tmp_path / "imgs", n=2)
    with pytest.raises(DataError, match="--mean and --std"):
        load_split(folder, PIX)


def test_broken_images_are_skipped_and_counted_then_fail_when_too_many(tmp_path):
    folder = _images(tmp_path / "imgs", n=12)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.warns(DataWarning, match="skipped 1 of"):
        split = load_split(folder, PIX, image_options=ImageOptions(mean=(0.5,), std=(0.5,), max_bad_fraction=0.2))
    assert "skipped 1" in " ".join(split.notes)
    for i in range(4):
        (folder / f"broken{i}.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match=r"5 of 17 fail to decode"):
        load_split(folder, PIX, image_options=IMAGENET)


@pytest.mark.parametrize("make, message", [
    (lambda p: (p / "empty").mkdir() or p / "empty", "it is empty"),
    (lambda p: (p / "docs").mkdir() or ((p / "docs" / "a.txt").write_text("x") and p / "docs"), "other entries: a.txt"),
    (lambda p: p / "nope", "found nothing"),
])
def test_bad_folders(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        load_split(make(tmp_path), PIX, image_options=IMAGENET)


def test_images_for_a_model_with_other_inputs_are_refused(tmp_path):
    folder = _images(tmp_path / "imgs", n=2)
    with pytest.raises(DataError, match="single image input"):
        load_split(folder, TEXT, image_options=IMAGENET)


def test_random_data_warns_loudly(tmp_path):
    with pytest.warns(DataWarning, match="RANDOM DATA"):
        split = load_split("random:16", PIX)
    assert split.kind == "random" and split.calibration and split.evaluation
    assert split.calibration[0]["pixel_values"].shape == (4, 3, 16, 16)
    with pytest.raises(DataError, match="random:N"):
        load_split("random:lots", PIX)


def test_split_holds_out_every_fourth_sample_or_uses_eval_data(tmp_path, tiny_bert_dir):
    txt = tmp_path / "s.txt"
    txt.write_text("\n".join(["the cat sat", "a dog", "the mat"] * 3) + "\n")
    split = load_split(txt, TEXT, tokenizer_dir=tiny_bert_dir, batch_size=4)
    assert split.samples == (7, 2)
    ev = tmp_path / "e.txt"
    ev.write_text("a dog\nthe mat\n")
    split = load_split(txt, TEXT, eval_data=ev, tokenizer_dir=tiny_bert_dir, batch_size=4)
    assert split.samples == (9, 2) and split.evaluation[0]["input_ids"].shape[0] == 2
    one = tmp_path / "one.txt"
    one.write_text("just one\n")
    with pytest.raises(DataError, match="at least 2 samples"):
        load_split(one, TEXT, tokenizer_dir=tiny_bert_dir)


def test_long_texts_are_truncated_with_a_warning(tmp_path, tiny_bert_dir):
    txt = tmp_path / "s.txt"
    txt.write_text("the cat\n" + " ".join(["dog"] * 20) + "\n")
    with pytest.warns(DataWarning, match=r"truncated 1 of 2 texts .* max sequence of 6 tokens .* line 2"):
        feeds = load_feeds(txt, TEXT, tokenizer_dir=tiny_bert_dir)
    assert feeds[0]["input_ids"].shape == (2, 6)


def test_npz_rows_are_split_and_shapes_checked(tmp_path):
    np.savez(tmp_path / "x.npz", pixel_values=np.zeros((8, 3, 16, 16), np.float32))
    split = load_split(tmp_path / "x.npz", PIX, batch_size=4)
    assert split.samples == (6, 2)  # the rows of one file are samples
    assert [f["pixel_values"].shape[0] for f in split.calibration] == [4, 2]
    np.savez(tmp_path / "bad.npz", pixel_values=np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(DataError, match=r"axis 2 is 8, expected 16"):
        check_fits(load_feeds(tmp_path / "bad.npz", PIX), PIX, "bad.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_feeds(tmp_path / "x.npz", PIX, batch_size=8)[0]["pixel_values"].shape == (8, 3, 16, 16)
