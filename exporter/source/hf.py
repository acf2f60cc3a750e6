"""hf: sources — a save_pretrained folder or a hub id, loaded with transformers' Auto classes.

The task picks the Auto class (default: from the config's architectures, or sentence-embedding
when the folder is a sentence-transformers model); the family table picks the inputs.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from exporter.source.families import FAMILIES, family_for, resolve_inputs
from exporter.source.spec import LoadedSource, SourceSpec, make_wrapper, model_name
from runtimes.errors import SourceError
from runtimes.manifest import IOSpec
from runtimes.samples import generate_feeds

TASK_AUTO_CLASS = {
    "feature-extraction": "AutoModel",
    "sentence-embedding": "AutoModel",  # loaded through sentence-transformers: pooling + normalize
    "fill-mask": "AutoModelForMaskedLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "image-classification": "AutoModelForImageClassification",
    "automatic-speech-recognition": "AutoModelForCTC",  # wav2vec2-style CTC heads (encoder-decoder ASR is refused)
    "audio-classification": "AutoModelForAudioClassification",
    "text-generation": "AutoModelForCausalLM",
    "zero-shot-image-classification": "AutoModel",
    # CLIP's towers with their projection heads, one engine each (exporter/recipes/zeroshot.py)
    "image-embedding": "CLIPVisionModelWithProjection",
    "text-embedding": "CLIPTextModelWithProjection",
}
_ARCH_SUFFIX_TASK = (
    ("ForSequenceClassification", "sequence-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForImageClassification", "image-classification"),
    ("ForMaskedLM", "fill-mask"),
    ("ForCTC", "automatic-speech-recognition"),
    ("ForAudioClassification", "audio-classification"),
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model", "merges.txt")


def default_task(config: Any, folder: Path | None) -> str:
    if folder is not None and (folder / "modules.json").is_file():
        return "sentence-embedding"
    if getattr(config, "model_type", None) in ("clip", "siglip", "chinese_clip", "altclip"):
        return "zero-shot-image-classification"
    audio = getattr(config, "model_type", None) in next(f for f in FAMILIES if f.name == "audio").model_types
    for arch in getattr(config, "architectures", None) or []:
        for suffix, task in _ARCH_SUFFIX_TASK:
            if arch.endswith(suffix):
                return "audio-classification" if audio and task == "sequence-classification" else task
    return "feature-extraction"


def _is_path_like(location: str) -> bool:
    return location.startswith((".", "/", "~")) or location.count("/") != 1 or Path(location).exists()


def load_hf(spec: SourceSpec) -> LoadedSource:
    import torch
    import transformers

    location = spec.location
    folder: Path | None = None
    if _is_path_like(location):
        folder = Path(location).expanduser()
        if not folder.exists():
            raise SourceError(
                f"Expected a model folder at '{location}' (written by save_pretrained), found nothing there. "
                "Check the path; for a Hub model pass its id, e.g. hf:sentence-transformers/all-MiniLM-L6-v2."
            )
        if not folder.is_dir() or not (folder / "config.json").is_file():
            found = sorted(p.name for p in folder.iterdir())[:10] if folder.is_dir() else [folder.name]
            raise SourceError(
                f"Expected '{location}' to be a Hugging Face model folder with config.json and weights "
                f"(save_pretrained output), found {found or 'an empty folder'}. Point hf: at the folder that "
                "holds config.json, or use onnx:<file> for an ONNX model."
            )
    try:
        config = transformers.AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as exc:
        where = "folder" if folder else "Hub id"
        raise SourceError(
            f"Expected to load a transformers config from {where} '{location}', but it failed: "
            f"{str(exc).strip().splitlines()[0][:300]}. Without network access to the Hugging Face Hub, "
            "download the model elsewhere (save_pretrained) and pass the local folder."
        ) from None
    task = spec.task or default_task(config, folder)
    if task not in TASK_AUTO_CLASS:
        raise SourceError(
            f"Expected a task among {sorted(TASK_AUTO_CLASS)}, found '{task}' in 'hf:{location}#{task}'. "
            "Leave #task out to pick it from the model's config."
        )
    if task in ("image-embedding", "text-embedding"):
        from exporter.source.towers import load_tower

        return load_tower(spec, config, folder, task)
    family = family_for(config)
    if task == "sentence-embedding":
        model, inner, call = _sentence_transformer(location)
    else:
        # With no explicit #task, load the class the folder was saved from (e.g. CLIPVisionModelWithProjection,
        # whose projection head AutoModel would drop); an explicit task picks the task's Auto class.
        archs = getattr(config, "architectures", None) or []
        saved_cls = getattr(transformers, archs[0], None) if archs and spec.task is None else None
        auto_cls = saved_cls if saved_cls is not None and hasattr(saved_cls, "from_pretrained") else \
            getattr(transformers, TASK_AUTO_CLASS[task])
        try:
            model = auto_cls.from_pretrained(location, dtype=torch.float32).eval()
        except (OSError, ValueError, KeyError) as exc:
            raise SourceError(
                f"Expected transformers' {auto_cls.__name__} to load '{location}' for task '{task}', but it "
                f"failed: {str(exc).strip().splitlines()[0][:300]}. Pick another task with #task, or check the "
                "folder's weights."
            ) from None
        inner = model
        accepted = set(inspect.signature(model.forward).parameters)
        extra = {"use_cache": False} if "use_cache" in accepted else {}

        def call(m: Any, kw: dict[str, Any]) -> Any:
            return m(**kw, **extra, return_dict=True)

    accepted = set(inspect.signature(inner.forward).parameters)
    inputs, dims, hints = resolve_inputs(family, config, accepted)
    io = IOSpec(inputs=inputs, outputs=[], dims=dims, values=hints)
    wrapper = make_wrapper(model, [s.name for s in inputs], call, generate_feeds(io, "opt"))
    tok_dir = folder if folder is not None and any((folder / f).is_file() for f in _TOKENIZER_FILES) else None
    return LoadedSource(
        spec,
        model_name(spec),
        io,
        module=wrapper,
        info={"task": task, "family": family.name, "model_type": config.model_type, "class": type(model).__name__},
        tokenizer_dir=tok_dir,
        hf_model=model if task != "sentence-embedding" else None,
    )


def _sentence_transformer(location: str) -> tuple[Any, Any, Any]:
    """Load with sentence-transformers so its own Pooling and Normalize modules are exported."""
    from runtimes._deps import require

    st = require("sentence_transformers", extra="st", purpose="The sentence-embedding task")
    try:
        model = st.SentenceTransformer(location, device="cpu").eval()
    except Exception as exc:  # sentence-transformers wraps many loader errors
        raise SourceError(
            f"Expected sentence-transformers to load '{location}', but it failed: {exc}. Use "
            f"hf:{location}#feature-extraction to export the bare transformer instead."
        ) from None
    inner = model[0].auto_model

    def call(m: Any, kw: dict[str, Any]) -> Any:
        out = m(dict(kw))
        return {"token_embeddings": out["token_embeddings"], "sentence_embedding": out["sentence_embedding"]}

    return model, inner, call
