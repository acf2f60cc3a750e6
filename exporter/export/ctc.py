"""What a CTC speech bundle ships for decoding without transformers: `ctc.json` (runtimes/speech.py).

From the model folder at build time: the tokenizer's vocabulary in id order (Wav2Vec2CTCTokenizer's
vocab.json), the blank id (its pad token), the word delimiter and the special tokens decoding skips; the
feature extractor's sampling rate, normalization and padding value (preprocessor_config.json); and the conv
feature encoder's kernels and strides, from which the runtime computes each clip's own number of frames.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from calibration.audio import FeatureConfig
from runtimes.speech import CTC_FILE

CTC_TASK = "automatic-speech-recognition"


def ctc_vocabulary(folder: Path | None, config: Any) -> dict[str, Any] | None:
    """ctc.json's content, or None when the folder holds no CTC tokenizer (vocab.json)."""
    if folder is None or not (Path(folder) / "vocab.json").is_file():
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    vocab = tok.get_vocab()
    tokens = [""] * (max(vocab.values()) + 1)
    for text, i in vocab.items():
        tokens[i] = text
    blank = tok.pad_token_id if tok.pad_token_id is not None else getattr(config, "pad_token_id", 0)
    return {
        "tokens": tokens, "blank": int(blank or 0), "word_delimiter": getattr(tok, "word_delimiter_token", None),
        # left out of the text; the pad token is the blank, which the decoding itself drops
        "special_tokens": [t for t in (tok.bos_token, tok.eos_token, tok.unk_token) if t],
        "features": asdict(FeatureConfig.of(Path(folder))),  # what calibration/audio.py reads for --data
        "conv": {"kernels": list(getattr(config, "conv_kernel", []) or []),
                 "strides": list(getattr(config, "conv_stride", []) or [])} if getattr(config, "conv_kernel", None) else None,
    }


def write_ctc(bundle: Path, spec: dict[str, Any]) -> str:
    (bundle / CTC_FILE).write_text(json.dumps(spec, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return CTC_FILE
