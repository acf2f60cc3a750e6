"""Loading a causal LM source: an hf: folder whose config names a causal LM (…ForCausalLM /
…LMHeadModel), or a GGUF checkpoint (`hf:<folder>#gguf=<file>`, `hf:<file.gguf>`, or a folder holding
one .gguf and no config.json; transformers dequantizes GGUF to FP32 with the `gguf` package, and the
tokenizer comes from the GGUF too)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exporter.source.spec import SourceSpec
from runtimes.errors import SourceError

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
# Prompt length, generated length: defaults for the engines' ranges (--shapes sequence=…,total_sequence=…).
DEFAULT_PROMPT, DEFAULT_TOTAL = 1024, 2048


def gguf_file(spec: SourceSpec) -> tuple[Path, str] | None:
    """(folder, file name) when the hf: source is a GGUF checkpoint."""
    loc = Path(spec.location)
    if spec.task and spec.task.startswith("gguf="):
        return loc, spec.task.split("=", 1)[1]
    if loc.is_file() and loc.suffix == ".gguf":
        return loc.parent, loc.name
    if loc.is_dir() and not (loc / "config.json").is_file():
        found = sorted(loc.glob("*.gguf"))
        if len(found) == 1:
            return loc, found[0].name
    return None


def load_causal_lm(spec: SourceSpec) -> tuple[Any, Any, dict[str, Any]]:
    """(model in FP32, transformers tokenizer or None, info for the manifest)."""
    import torch
    import transformers

    from runtimes._deps import require

    gg = gguf_file(spec)
    folder = gg[0] if gg else Path(spec.location)
    kwargs: dict[str, Any] = {"gguf_file": gg[1]} if gg else {}
    if gg:
        require("gguf", extra="llm", purpose="Loading a GGUF checkpoint")
        if not (folder / gg[1]).is_file():
            raise SourceError(f"Expected the GGUF file '{folder / gg[1]}', found nothing there. Check #gguf=FILE.")
    elif not (folder / "config.json").is_file():
        raise SourceError(
            f"Expected a causal LM folder with config.json (save_pretrained output) or a .gguf file at '{folder}', "
            "found neither. Point hf: at the folder, or at the .gguf file."
        )
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kwargs).eval()
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise SourceError(
            f"Expected transformers' AutoModelForCausalLM to load '{folder}'{' (' + gg[1] + ')' if gg else ''}, but it "
            f"failed: {str(exc).strip().splitlines()[0][:300]}. Check the folder's weights"
            + (", and that the 'gguf' and 'accelerate' packages are installed (pip install 'enginekit[llm]')." if gg else ".")
        ) from None
    tokenizer = None
    has_tok = gg is not None or any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    if has_tok:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), **kwargs)
        except (OSError, ValueError, KeyError):
            tokenizer = None
    info = {"task": "text-generation", "family": "causal-lm", "model_type": model.config.model_type,
            "class": type(model).__name__, **({"gguf": gg[1]} if gg else {})}
    return model, tokenizer, info


def generation_metadata(model: Any, tokenizer: Any) -> dict[str, Any]:
    """generation.json's stop, pad and bos ids, the chat template and the special tokens' text (what a chat
    template names as bos_token / eos_token), from the model's generation config and its tokenizer."""
    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else model.config.eos_token_id
    eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    pad = gen.pad_token_id if gen.pad_token_id is not None else getattr(model.config, "pad_token_id", None)
    special = {k: str(getattr(tokenizer, k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
               if tokenizer is not None and getattr(tokenizer, k, None) is not None}
    return {
        "eos_token_ids": eos_ids,
        "pad_token_id": int(pad) if pad is not None else (eos_ids[0] if eos_ids else 0),
        "bos_token_id": gen.bos_token_id if gen.bos_token_id is not None else getattr(model.config, "bos_token_id", None),
        "chat_template": getattr(tokenizer, "chat_template", None) if tokenizer is not None else None,
        "special_tokens": special,
    }
