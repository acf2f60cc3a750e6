"""Causal LMs on ONNX Runtime GenAI: its model builder writes the decoder at build time, enginekit's token gate
proves it against transformers, runtimes.genai runs it (og.Generator for batches, og.Engine for requests)."""

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from exporter.pipeline import BuildOptions, build
from exporter.source.shapes import parse_shapes
from runtimes.errors import IncompatibleEngine, UsageError
from runtimes.generate import SamplingOptions, load_generator
from tests.conftest import run_cli

pytest.importorskip("onnxruntime_genai")


def _hf_greedy(folder: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        out.append(seq[0, len(p):].tolist())
    return out


def test_bundle_layout_manifest_and_gate(genai_bundle):
    m = json.loads((genai_bundle / "manifest.json").read_text())
    gen = json.loads((genai_bundle / "generation.json").read_text())
    assert gen["runtime"] == "onnxruntime-genai" and gen["genai"]["builder"]["precision"] == "fp32"
    assert m["target"]["options"]["generator"] == "onnxruntime-genai" and m["source"]["exporter"].startswith("onnxruntime-genai")
    assert m["target"]["options"]["ops"]["GroupQueryAttention"] == 2  # one per layer: the builder's fused attention
    assert m["target"]["versions"]["onnxruntime-genai"] == "0.18.0"
    assert {"genai/genai_config.json", "genai/model.onnx", "genai/tokenizer.json", "generation.json"} <= set(m["files"])
    config = json.loads((genai_bundle / "genai" / "genai_config.json").read_text())
    assert config["search"]["max_length"] == m["io"]["dims"]["total_sequence"]["max"]
    assert m["parity"]["status"] == "passed" and m["parity"]["worst"]["tokens"]["equal"] == 1.0
    assert sum("identical for 32 steps" in n for n in m["parity"]["notes"]) == 4  # 3 prompts + the padded batch
    assert gen["special_tokens"]["eos_token"] == "<|endoftext|>"


def test_tokens_equal_transformers_alone_and_in_a_padded_batch(genai_bundle, tiny_qwen2_dir):
    from runtimes.genai import GenaiGenerator

    # token 0 is the model's eos and pad: a prompt holding it must still be attended (GenAI masks its pad id)
    prompts = [[5, 17, 33, 41, 9, 100], [7, 8, 9], [12, 0, 40]]
    want = _hf_greedy(tiny_qwen2_dir, prompts, 12)
    opts = SamplingOptions(max_new_tokens=12, stop_token_ids=[])
    with load_generator(genai_bundle) as g:
        assert isinstance(g, GenaiGenerator)
        assert [g.generate_ids([p], opts)[0].tokens for p in prompts] == want
        assert [r.tokens for r in g.generate_ids(prompts, opts)] == want
        # stop tokens are enginekit's: the row ends at the first stop token, the others go on
        first = want[1][3]
        rows = g.generate_ids(prompts[:2], SamplingOptions(max_new_tokens=12, stop_token_ids=[first]))
        assert rows[1].tokens == want[1][:4] and rows[1].finish_reason == "stop"
        assert rows[0].tokens == want[0][:want[0].index(first) + 1] if first in want[0] else rows[0].tokens == want[0]
        sampled = [g.generate_ids([prompts[0]], SamplingOptions(max_new_tokens=10, temperature=0.8, top_p=0.9, top_k=20,
                                                               seed=3, stop_token_ids=[]))[0].tokens for _ in range(2)]
        assert sampled[0] == sampled[1] and len(sampled[0]) == 10
        cancelled = g.generate_ids([prompts[0]], opts, cancel=lambda _row: True)[0]
        assert cancelled.finish_reason == "cancelled" and cancelled.tokens == []


def test_engine_requests_batch_continuously_and_cancel(genai_bundle, tiny_qwen2_dir):
    prompts = [[5, 17, 33, 41, 9, 100], [7, 8, 9], [12, 13, 40, 41], [3, 4]]
    want = _hf_greedy(tiny_qwen2_dir, prompts, 16)
    opts = SamplingOptions(max_new_tokens=16, stop_token_ids=[])
    with load_generator(genai_bundle) as g:
        seen: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
        handles = [g.submit(p, opts, on_token=seen[i].append) for i, p in enumerate(prompts)]
        results = [h.future.result(timeout=60) for h in handles]
        assert [r.tokens for r in results] == want and [seen[i] for i in range(len(prompts))] == want
        assert all(r.finish_reason == "length" for r in results)
        # a stop token ends a request; cancel() ends another mid-way, and the engine goes on serving
        stop = g.submit(prompts[1], SamplingOptions(max_new_tokens=16, stop_token_ids=[want[1][2]])).future.result(60)
        assert stop.tokens == want[1][:3] and stop.finish_reason == "stop"
        started = threading.Event()
        slow = g.submit(prompts[0], SamplingOptions(max_new_tokens=200, stop_token_ids=[]),
                        on_token=lambda _t: (started.set(), time.sleep(0.01)))
        assert started.wait(30)
        slow.cancel()
        late = slow.future.result(timeout=30)
        assert late.finish_reason == "cancelled" and 0 < len(late.tokens) < 200
        assert g.submit(prompts[2], opts).future.result(60).tokens == want[2]


@pytest.mark.slow
def test_int4_and_int8_weight_only(tiny_qwen2_dir, tmp_path):
    for precision in ("int4", "int8"):
        res = build(f"hf:{tiny_qwen2_dir}", BuildOptions(output=tmp_path / precision, precision=precision))
        m = res.manifest
        assert res.parity.passed and m.target.options["generator"] == "onnxruntime-genai"
        # per layer: fused qkv, o, gate, up, down; and the LM head
        assert m.target.options["ops"]["MatMulNBits"] == 2 * 5 + 1 and "weight-only" in m.precision["weights"]
        with load_generator(res.bundle) as g:
            assert len(g.generate_ids([[5, 6, 7]], SamplingOptions(max_new_tokens=8, stop_token_ids=[]))[0].tokens) == 8


def test_choosing_the_generator(tiny_qwen2_dir, tmp_path):
    # FP16 on the CPU: GenAI's CPU FP16 decoder does not run in onnxruntime 1.32, so auto takes enginekit's
    with pytest.raises(UsageError, match="FP16 decoder"):
        build(f"hf:{tiny_qwen2_dir}", BuildOptions(output=tmp_path / "a", precision="fp16", generator="genai"))
    with pytest.raises(UsageError, match="int4"):
        build(f"hf:{tiny_qwen2_dir}", BuildOptions(output=tmp_path / "b", precision="int4", generator="enginekit"))
    with pytest.raises(UsageError, match="--generator auto, genai or enginekit"):
        build(f"hf:{tiny_qwen2_dir}", BuildOptions(output=tmp_path / "c", generator="vllm"))
    proc = run_cli("build", "--precision", "int4", str(tiny_qwen2_dir.parent / "nothing.onnx"))
    assert proc.returncode == 2


@pytest.mark.slow
def test_unsupported_architecture_keeps_enginekits_export(tmp_path):
    import torch
    import transformers

    from tests.models.causal import tiny_tokenizer

    folder = tmp_path / "gpt2"
    folder.mkdir()
    vocab = tiny_tokenizer(folder)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2,
                                                         n_positions=128, eos_token_id=0, bos_token_id=0)).save_pretrained(folder)
    with pytest.raises(UsageError, match="GPT2LMHeadModel"):
        build(f"hf:{folder}", BuildOptions(output=tmp_path / "x", generator="genai"))
    shapes = parse_shapes("batch=1:1:2,sequence=1:16:32,total_sequence=2:64:96")
    res = build(f"hf:{folder}", BuildOptions(output=tmp_path / "auto", shapes=shapes))
    assert res.parity.passed and "generator" not in res.manifest.target.options
    assert set(json.loads((res.bundle / "generation.json").read_text())["components"]) == {"prefill", "decode"}


def test_tampered_config_and_triton_refusal(genai_bundle, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(genai_bundle, bad)
    config = bad / "genai" / "genai_config.json"
    data = json.loads(config.read_text())
    data["model"]["decoder"]["filename"] = "../../elsewhere.onnx"
    config.write_text(json.dumps(data))
    with pytest.raises(IncompatibleEngine, match="sha256"):
        load_generator(bad)
    with pytest.raises(IncompatibleEngine, match="name the bundle's decoder"):
        load_generator(bad, verify=False)
    for backend in (None, "python"):
        args = ["triton", str(genai_bundle), "--repo", str(tmp_path / "repo")] + (["--backend", backend] if backend else [])
        proc = run_cli(*args)
        assert proc.returncode == 2 and "token loop" in proc.stderr and "enginekit serve" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_cli_generate(genai_bundle, tiny_qwen2_dir):
    proc = run_cli("generate", str(genai_bundle), "-p", "The capital", "-p", "def", "-n", "6", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) == 2 and all(len(r["tokens"]) <= 6 for r in rows) and np.isfinite(rows[0]["ttft_ms"])


@pytest.mark.gpu
def test_cuda_bf16_on_genai(tiny_qwen2_dir, tmp_path):
    """On a GPU: the BF16 CUDA decoder GenAI's builder writes passes enginekit's gate for real; CUDA graph on
    (batch 1) and off, a batch and the Engine's requests give the same greedy tokens."""
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDA provider")
    from runtimes.genai import GenaiGenerator

    res = build(f"hf:{tiny_qwen2_dir}", BuildOptions(output=tmp_path / "bf16", device="cuda", precision="bf16"))
    assert res.parity.status == "passed", res.parity.failures()
    assert res.manifest.target.options["generator"] == "onnxruntime-genai"
    opts = SamplingOptions(max_new_tokens=16, stop_token_ids=[])
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    with GenaiGenerator(res.bundle, cuda_graph=True) as g, GenaiGenerator(res.bundle, cuda_graph=False) as plain:
        singles = [g.generate_ids([p], opts)[0].tokens for p in prompts]
        assert singles == [plain.generate_ids([p], opts)[0].tokens for p in prompts]
        assert [r.tokens for r in g.generate_ids(prompts, opts)] == singles
        assert [h.future.result(60).tokens for h in [plain.submit(p, opts) for p in prompts]] == singles


@pytest.mark.slow
def test_paged_attention_build(tiny_qwen2_dir, tmp_path):
    """--genai-attention paged: GenAI's PagedAttention decoder with a KV block pool sized by the dims; built here
    for CUDA without a GPU (published not checked); refused where GenAI has no paged decoder."""
    shapes = parse_shapes("batch=1:1:4,sequence=1:16:64,total_sequence=2:64:512")
    res = build(f"hf:{tiny_qwen2_dir}", BuildOptions(output=tmp_path / "paged", device="cuda", precision="bf16",
                                                     genai_attention="paged", shapes=shapes))
    gen = json.loads((res.bundle / "generation.json").read_text())
    config = json.loads((res.bundle / "genai" / "genai_config.json").read_text())
    assert gen["genai"]["attention"] == "paged" and res.manifest.target.options["ops"]["PagedAttention"] == 2
    # 4 requests at 512 positions in blocks of 256: 8 blocks, fixed
    assert config["engine"]["dynamic_batching"] == {"block_size": 256, "max_batch_size": 4, "num_blocks": 8}
    assert "--genai-attention paged" in " ".join(res.manifest.build_command)
    if not res.parity.status == "passed":
        assert res.parity.status == "not-checked"  # no CUDA here
    with pytest.raises(UsageError, match="CUDA in FP16/BF16 only"):
        build(f"hf:{tiny_qwen2_dir}", BuildOptions(output=tmp_path / "a", genai_attention="paged"))
    with pytest.raises(UsageError, match="enginekit's own graphs"):
        build(f"hf:{tiny_qwen2_dir}", BuildOptions(output=tmp_path / "b", device="cuda", precision="bf16",
                                                   genai_attention="paged", generator="enginekit"))


@pytest.mark.gpu
def test_cuda_paged_attention(tiny_qwen2_dir, tmp_path):
    """On a GPU: the PagedAttention decoder passes the gate (its tokens, the twin's logits) and a batch through the
    Engine starts with the GroupQueryAttention bundle's greedy tokens (the first 4: BF16 kernels of the two
    attentions may part later at a near-tie of the random weights, which the gate judges with its noise model)."""
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDA provider")
    paged = build(f"hf:{tiny_qwen2_dir}", BuildOptions(output=tmp_path / "paged", device="cuda", precision="bf16",
                                                       genai_attention="paged"))
    assert paged.parity.status == "passed", paged.parity.failures()
    plain = build(f"hf:{tiny_qwen2_dir}", BuildOptions(output=tmp_path / "plain", device="cuda", precision="bf16"))
    opts = SamplingOptions(max_new_tokens=16, stop_token_ids=[])
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    with load_generator(paged.bundle) as p, load_generator(plain.bundle) as q:
        got, want = p.generate_ids(prompts, opts), q.generate_ids(prompts, opts)
        assert [r.tokens[:4] for r in got] == [r.tokens[:4] for r in want] and all(len(r.tokens) == 16 for r in got)
        with pytest.raises(UsageError, match="PagedAttention"):
            p.generate_ids(prompts[:1], opts, record_logits=True)


def test_a_refused_engine_is_never_published_not_checked(genai_bundle, tiny_qwen2_dir, tmp_path):
    """An engine the device's own runtime refuses fails the gate instead of 'not checked' (the H200 smoke found a
    GenAI FP32 CUDA decoder published 'not checked' because its load error looked like a missing GPU)."""
    import shutil

    from exporter.gate.cases import not_runnable_here
    from runtimes.errors import EngineRefused
    from runtimes.genai import GenaiGenerator

    with pytest.raises(EngineRefused):
        not_runnable_here(EngineRefused("refused"), "cuda", "bf16")
    assert not_runnable_here(IncompatibleEngine("no GPU here. Rebuild"), "cuda", "bf16") == "no GPU here"
    bad = tmp_path / "bad"
    shutil.copytree(genai_bundle, bad)
    (bad / "genai" / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(EngineRefused, match="refused"):
        GenaiGenerator(bad, verify=False)
    with pytest.raises(UsageError, match="FP32 CUDA decoder"):
        build(f"hf:{tiny_qwen2_dir}", BuildOptions(output=tmp_path / "x", device="cuda", generator="genai"))


def test_parity_command_reruns_the_token_gate(genai_bundle):
    from exporter.gate.recheck import check_bundle

    report = check_bundle(genai_bundle, trust_recorded=True)
    assert report.passed and {o.name for c in report.cases for o in c.outputs} == {"logits", "tokens"}
