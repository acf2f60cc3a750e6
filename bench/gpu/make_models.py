"""Random-weight models at real sizes for the GPU runs (no hub there): CLIP ViT-L/14's image tower.

    python bench/gpu/make_models.py /tmp/models
"""

import sys
from pathlib import Path


def make_clip_vision(out: Path) -> Path:
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    # openai/clip-vit-large-patch14's vision config: 24 layers, width 1024, 16 heads, patch 14, 224 px, projection 768.
    cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    folder = out / "clip-vit-l14-vision"
    CLIPVisionModelWithProjection(cfg).eval().save_pretrained(folder)
    return folder


if __name__ == "__main__":
    print("wrote", make_clip_vision(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/models")))
