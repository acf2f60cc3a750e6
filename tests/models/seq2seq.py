"""Tiny encoder-decoder LMs built from configs (no downloads), each with the byte-level BPE tokenizer of
tests/models/causal.py (token 0 is the end-of-sequence, padding and decoder start token)."""

from __future__ import annotations

from pathlib import Path

from tests.models.causal import tiny_tokenizer


def tiny_seq2seq(folder: Path, family: str = "bart") -> Path:
    """A 2+2-layer `family` (bart | t5 | marian | mbart | whisper: 80 mel bins, 30 s | blip: 32×32 images) model
    with its tokenizer. Initialised wider than
    transformers' default (init_std / initializer_factor) so that its greedy and beam outputs vary with the
    source instead of repeating one token: a beam search that picked wrong beams would show."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = tiny_tokenizer(folder)
    special = dict(pad_token_id=0, eos_token_id=0, bos_token_id=0, decoder_start_token_id=0)
    if family == "blip":
        config = transformers.BlipConfig(
            text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, sep_token_id=2,
                             eos_token_id=2, pad_token_id=0),
            vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                               num_attention_heads=4))
        cls = transformers.BlipForConditionalGeneration
    elif family == "whisper":
        config = transformers.WhisperConfig(vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2,
                                            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37,
                                            decoder_ffn_dim=37, num_mel_bins=80, max_source_positions=1500,
                                            max_target_positions=64, init_std=0.2,
                                            **{**special, "decoder_start_token_id": 1})
        cls = transformers.WhisperForConditionalGeneration
    elif family == "t5":
        config = transformers.T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                       initializer_factor=4.0, **special)
        cls = transformers.T5ForConditionalGeneration
    else:
        config_cls, cls = {"bart": (transformers.BartConfig, transformers.BartForConditionalGeneration),
                           "marian": (transformers.MarianConfig, transformers.MarianMTModel),
                           "mbart": (transformers.MBartConfig, transformers.MBartForConditionalGeneration)}[family]
        config = config_cls(vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                            decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=128,
                            init_std=0.2, forced_eos_token_id=0, **special)
    torch.manual_seed(0)
    cls(config).eval().save_pretrained(folder)
    return folder
