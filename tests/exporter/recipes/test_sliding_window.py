"""Sliding-window decoders (Mistral, Gemma 2/3, Starcoder2): enginekit's graphs keep every layer's whole
cache and the model's own mask limits attention to the window, so the token gate, with prompts longer than
the window, compares against transformers' generate() past it. GenAI 0.18's decoder failed there (CPU)."""

import json

import pytest

from tests.models.causal import tiny_tokenizer

pytestmark = pytest.mark.slow


def test_a_mistral_gates_on_prompts_longer_than_its_window(tmp_path):
    import torch
    import transformers

    from exporter.pipeline import BuildOptions, build

    folder = tmp_path / "mistral"
    folder.mkdir()
    vocab = tiny_tokenizer(folder)
    torch.manual_seed(0)
    config = transformers.MistralConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        sliding_window=8, eos_token_id=0, pad_token_id=0, bos_token_id=0)
    transformers.MistralForCausalLM(config).eval().save_pretrained(folder)
    bundle = build(f"hf:{folder}", BuildOptions(output=tmp_path / "out")).bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["target"]["options"].get("generator") != "onnxruntime-genai"  # auto: the window is shorter
    assert any("sliding window 8" in n for n in manifest["source"]["notes"])
    parity = json.loads((bundle / "parity.json").read_text())
    assert parity["status"] == "passed"
    lengths = [int(c["label"].split("(")[1].split(" tokens")[0]) for c in parity["cases"] if c["label"].startswith("prompt[")]
    assert max(lengths) > 8, lengths
