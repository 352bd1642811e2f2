"""Files in the layouts published unlearned checkpoints use: a diffusers UNet folder (SD3: transformer
folder), a text encoder folder (AdvUnlearn's ``CLIPTextModel``), both with perturbed weights of the tiny
model of a family."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPTextModel

from unlearn_exp.models import build_tiny, build_tiny_sd3

TINY = {"sd1": build_tiny, "sd3": lambda: build_tiny_sd3(seed=0)}


def _perturb(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def unet_folder(path: Path, seed: int = 0, family: str = "sd1") -> Path:
    """A ``save_pretrained`` folder of the denoiser (SD v1: UNet; SD3: transformer) whose weights differ
    from the tiny model's."""
    unet = TINY[family]().denoiser
    _perturb(unet, seed)
    unet.save_pretrained(str(path), safe_serialization=True)
    return Path(path)


def text_encoder_folder(path: Path, seed: int = 0, family: str = "sd1") -> Path:
    """A ``save_pretrained`` CLIPTextModel folder (AdvUnlearn's layout) with perturbed weights of the
    tiny model's first (CLIP-L) text encoder; SD3's loses its projection, as AdvUnlearn's model has none."""
    own = TINY[family]().text_encoder
    encoder = CLIPTextModel(own.config)
    tower = own.state_dict()
    encoder.load_state_dict(
        {k.removeprefix("text_model."): v for k, v in tower.items() if not k.startswith("text_projection.")}
    )
    _perturb(encoder, seed)
    encoder.save_pretrained(str(path), safe_serialization=True)
    return Path(path)
