"""The generate runtime (no torch): sampling, stop tokens, streaming, padding, limits, refusals."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from runtimes.errors import IncompatibleEngine, InvalidInput, UsageError
from runtimes.generate import SamplingOptions, load_generator, sample_next
from tests.conftest import ROOT


def test_sampling_rules():
    rng = np.random.default_rng(0)
    logits = np.array([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]], np.float32)
    top1 = SamplingOptions(temperature=1.0, top_k=1)
    assert sample_next(logits, top1, rng).tolist() == [1, 0]
    nucleus = SamplingOptions(temperature=1.0, top_p=0.01)  # only the most likely token reaches it
    assert sample_next(logits, nucleus, rng).tolist() == [1, 0]
    draws = [sample_next(logits, SamplingOptions(temperature=1.0, top_k=2), np.random.default_rng(s))[0] for s in range(200)]
    assert set(draws) == {1, 3}  # top-2 of row 0, both drawn, nothing else
    with pytest.raises(UsageError, match="top_p"):
        SamplingOptions(top_p=0).validate()


def test_stop_tokens_streaming_and_seed(qwen2_bundle):
    with load_generator(qwen2_bundle) as g:
        free = g.generate("The capital", SamplingOptions(max_new_tokens=10, stop_token_ids=[]))
        assert len(free.tokens) == 10 and free.finish_reason == "length"
        stopped = g.generate("The capital", SamplingOptions(max_new_tokens=10, stop_token_ids=[free.tokens[2]]))
        assert stopped.tokens == free.tokens[:3] and stopped.finish_reason == "stop"
        pieces: list[str] = []
        streamed = g.generate("The capital", SamplingOptions(max_new_tokens=10, stop_token_ids=[]), on_text=pieces.append)
        assert "".join(pieces) == streamed.text.rstrip("\ufffd") and streamed.tokens == free.tokens
        sample = SamplingOptions(max_new_tokens=10, temperature=1.0, seed=3, stop_token_ids=[])
        assert g.generate("The capital", sample).tokens == g.generate("The capital", sample).tokens


def test_padded_batch_equals_single_prompts(qwen2_bundle):
    with load_generator(qwen2_bundle) as g:
        opts = SamplingOptions(max_new_tokens=12, stop_token_ids=[])
        prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21], [40, 41, 42, 43]]
        batch = g.generate_ids(prompts, opts)
        for row, p in zip(batch, prompts):
            assert row.tokens == g.generate_ids([p], opts)[0].tokens


def test_limits_and_refusals(qwen2_bundle, bert_bundle):
    with load_generator(qwen2_bundle) as g:
        with pytest.raises(InvalidInput, match="maximum length"):
            g.generate_ids([[1] * g.max_length], SamplingOptions())
        with pytest.raises(InvalidInput, match="at most 16 prompts"):
            g.generate_ids([[1]] * 17, SamplingOptions())
        near = g.generate_ids([[1] * (g.max_length - 3)], SamplingOptions(max_new_tokens=50, stop_token_ids=[]))[0]
        assert len(near.tokens) == 3 and near.finish_reason == "length"
    with pytest.raises(IncompatibleEngine, match="generation bundle"):
        load_generator(bert_bundle)


def test_generation_runtime_imports_no_torch(qwen2_bundle):
    code = textwrap.dedent(f"""
        import sys
        from runtimes.generate import SamplingOptions, load_generator
        with load_generator({str(qwen2_bundle)!r}) as g:
            out = g.generate("Once upon", SamplingOptions(max_new_tokens=4))
        heavy = [m for m in ("torch", "transformers", "exporter", "calibration") if m in sys.modules]
        print("HEAVY:", heavy, len(out.tokens))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY: []" in proc.stdout


@pytest.mark.gpu
def test_cuda_generation_keeps_the_cache_on_the_gpu(tiny_qwen2_dir, tmp_path):
    """On a GPU: a native BF16 CUDA bundle (GroupQueryAttention decode) passes its gate for real,
    and the CUDA loop (IO binding, past OrtValues on the device) gives the CPU loop's tokens."""
    from exporter.pipeline import BuildOptions, build

    res = build(f"hf:{tiny_qwen2_dir}", BuildOptions(output=tmp_path / "bf16", device="cuda", precision="bf16",
                                                     lowering="native", generator="enginekit"))
    assert res.parity.status == "passed", res.parity.failures()
    fp32 = build(f"hf:{tiny_qwen2_dir}", BuildOptions(output=tmp_path / "fp32", device="cuda", generator="enginekit"))
    opts = SamplingOptions(max_new_tokens=16, stop_token_ids=[])
    prompts = [[5, 6, 7, 8], [9, 10]]
    with load_generator(fp32.bundle, device="cuda") as g, load_generator(fp32.bundle, device="cpu") as c:
        assert [r.tokens for r in g.generate_ids(prompts, opts)] == [r.tokens for r in c.generate_ids(prompts, opts)]
