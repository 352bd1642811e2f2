"""Files in the layouts published unlearned checkpoints use: a diffusers UNet folder, a text encoder
folder (AdvUnlearn), both with perturbed weights of the tiny model."""

from __future__ import annotations

from pathlib import Path

import torch

from unlearn_exp.models import build_tiny


def _perturb(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def unet_folder(path: Path, seed: int = 0) -> Path:
    """A ``save_pretrained`` UNet folder whose weights differ from the tiny model's."""
    unet = build_tiny().unet
    _perturb(unet, seed)
    unet.save_pretrained(str(path), safe_serialization=True)
    return Path(path)


def text_encoder_folder(path: Path, seed: int = 0) -> Path:
    """A ``save_pretrained`` CLIPTextModel folder (AdvUnlearn's layout) with perturbed weights."""
    encoder = build_tiny().text_encoder
    _perturb(encoder, seed)
    encoder.save_pretrained(str(path), safe_serialization=True)
    return Path(path)
