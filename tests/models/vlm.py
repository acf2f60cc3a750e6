"""A tiny Qwen2-VL built from a config (no downloads): random weights, a trained byte-level BPE
tokenizer with the Qwen2-VL special tokens, and the image processor's config, so that
transformers' own processor (the reference) and `enginekit build hf:DIR` both load the folder."""

from __future__ import annotations

from pathlib import Path

from .causal import SENTENCES

# Qwen2-VL's special tokens (ids follow the trained vocabulary; the config points at them).
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_vl_tokenizer(folder: Path, vocab: int = 320) -> dict[str, int]:
    """Train the BPE (tests/models/causal.py's recipe) with the VL special tokens; returns their ids."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 10 + ["Describe the image.", "What is in this picture?"] * 10, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return {t: int(fast.convert_tokens_to_ids(t)) for t in SPECIAL} | {"vocab": len(fast)}


def _qwen2_text(vocab: int) -> dict[str, object]:
    """The tiny text decoder of Qwen2-VL and Qwen2.5-VL: 2 layers, 4 query / 2 key-value heads of 16."""
    return dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                eos_token_id=0, pad_token_id=0, bos_token_id=0)


def tiny_qwen2_vl(folder: Path, *, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 64) -> Path:
    """Vision: depth 2, width 32, patches of 14 merged 2×2 into the text width 64; text: 2 layers,
    4 query / 2 key-value heads of 16 (M-RoPE sections 2+3+3 = 8 frequencies)."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    ids = tiny_vl_tokenizer(folder)
    cfg = transformers.Qwen2VLConfig(
        text_config=_qwen2_text(ids["vocab"]),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=0, pad_token_id=0, bos_token_id=0,
    )
    torch.manual_seed(0)
    transformers.Qwen2VLForConditionalGeneration(cfg).eval().save_pretrained(folder)
    # The image processor's config (preprocessor_config.json). The PIL-backed class: transformers'
    # default one, and its AutoProcessor (whose video half), need torchvision, which is not installed.
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels).save_pretrained(folder)
    return folder


def _save_processor(folder: Path, *, patch_size: int, min_pixels: int, max_pixels: int, **more: object) -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    Qwen2VLImageProcessorPil(patch_size=patch_size, min_pixels=min_pixels, max_pixels=max_pixels, **more).save_pretrained(folder)


def _special_ids(ids: dict[str, int]) -> dict[str, int]:
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def tiny_qwen2_5_vl(folder: Path) -> Path:
    """Qwen2.5-VL: vision depth 2 (layer 1 full attention, layer 0 in windows of 56 px = 2×2 merged tokens),
    width 32, SwiGLU MLP, patches of 14 merged 2×2 into the text width 64; text as tiny_qwen2_vl's."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    ids = tiny_vl_tokenizer(folder)
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=_qwen2_text(ids["vocab"]),
        vision_config=dict(depth=2, hidden_size=32, out_hidden_size=64, num_heads=2, intermediate_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        **_special_ids(ids), eos_token_id=0, pad_token_id=0, bos_token_id=0,
    )
    torch.manual_seed(0)
    transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval().save_pretrained(folder)
    _save_processor(folder, patch_size=14, min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    return folder


def tiny_qwen3_vl(folder: Path) -> Path:
    """Qwen3-VL: vision depth 3 with deepstack features after layers 0 and 1, a learned 8×8 position table
    interpolated to the grid, patches of 16 merged 2×2 into the text width 64; text: 3 Qwen3 layers (q/k norm),
    head_dim 16, interleaved M-RoPE (sections 2+3+3). Normalisation 0.5/0.5 as the released processor's."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    ids = tiny_vl_tokenizer(folder)
    cfg = transformers.Qwen3VLConfig(
        text_config=dict(vocab_size=ids["vocab"], hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True},
                         eos_token_id=0, pad_token_id=0, bos_token_id=0),
        vision_config=dict(depth=3, hidden_size=32, out_hidden_size=64, num_heads=2, intermediate_size=64,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[0, 1]),
        **_special_ids(ids), eos_token_id=0, pad_token_id=0, bos_token_id=0,
    )
    torch.manual_seed(0)
    transformers.Qwen3VLForConditionalGeneration(cfg).eval().save_pretrained(folder)
    _save_processor(folder, patch_size=16, min_pixels=64 * 64, max_pixels=32 * 32 * 64, merge_size=2,
                    image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return folder
