"""One tower of a CLIP folder as a source (`hf:DIR#image-embedding`, `hf:DIR#text-embedding`): the
vision or text model with its projection head, loaded by transformers' *WithProjection classes. The
zero-shot recipe (exporter/recipes/zeroshot.py) builds one engine per tower from these."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exporter.source.families import FAMILIES, family_for, resolve_inputs
from exporter.source.spec import LoadedSource, SourceSpec, make_wrapper, model_name
from runtimes.errors import UsageError
from runtimes.manifest import IOSpec
from runtimes.samples import generate_feeds
from runtimes.zeroshot import ROLES

TOWERS = {"image-embedding": ("image", "CLIPVisionModelWithProjection", "vision"),
          "text-embedding": ("text", "CLIPTextModelWithProjection", "text-encoder")}
PART_TASK = {role: task for task, (role, _, _) in TOWERS.items()}
DUAL_ENCODERS = ("clip",)  # model types whose towers transformers ships with projection heads


def load_tower(spec: SourceSpec, config: Any, folder: Path | None, task: str) -> LoadedSource:
    """One tower of a CLIP folder as a source: pixel_values → image_embeds, or input_ids and
    attention_mask → text_embeds (the projected, unnormalized embeddings)."""
    import copy
    import inspect

    import torch
    import transformers

    role, cls_name, family_name = TOWERS[task]
    if getattr(config, "model_type", None) not in DUAL_ENCODERS:
        raise UsageError(
            f"Expected a CLIP model folder for #{task}, found model_type '{getattr(config, 'model_type', None)}' in "
            f"'{spec.location}'. #image-embedding and #text-embedding load CLIP's towers; for other models pick "
            "another task, or leave #task out."
        )
    cls = getattr(transformers, cls_name)
    # The tower's own config, with the projection size that CLIPConfig keeps at its top level
    # (loaded alone, the tower config would default to 512 and refuse the checkpoint's head).
    tower_config = copy.deepcopy(config.vision_config if role == "image" else config.text_config)
    tower_config.projection_dim = config.projection_dim
    try:
        model = cls.from_pretrained(spec.location, config=tower_config, dtype=torch.float32).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # RuntimeError: weights that do not fit
        raise UsageError(
            f"Expected transformers' {cls_name} to load the {role} tower of '{spec.location}', but it failed: "
            f"{str(exc).strip().splitlines()[0][:300]}. Check the folder's weights."
        ) from None
    family = next(f for f in FAMILIES if f.name == family_name)
    accepted = set(inspect.signature(model.forward).parameters)
    inputs, dims, hints = resolve_inputs(family, config, accepted)
    io = IOSpec(inputs=inputs, outputs=[], dims=dims, values=hints)
    output = ROLES[role]

    def call(m: Any, kw: dict[str, Any]) -> Any:
        return {output: getattr(m(**kw, return_dict=True), output)}

    wrapper = make_wrapper(model, [s.name for s in inputs], call, generate_feeds(io, "opt"))
    return LoadedSource(spec, model_name(spec), io, module=wrapper, hf_model=model,
                        info={"task": task, "family": family_for(config).name, "model_type": config.model_type,
                              "class": cls_name, "tower": role},
                        tokenizer_dir=folder if role == "text" and folder is not None and _has_tokenizer(folder) else None)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
