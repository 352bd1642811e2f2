"""SPM adapter files in SPM's key layout."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from unlearn_exp.unlearning.spm import spm_layers


def spm_file(unet, path, rank: int = 1, alpha: float = 1.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """A file as SPM's ``save_weights`` writes it, with random (non-zero) adapters."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for stem, layer in spm_layers(unet).items():
        if isinstance(layer, torch.nn.Linear):
            down = torch.randn(rank, layer.in_features, generator=g) * 0.2
            up = torch.randn(layer.out_features, rank, generator=g) * 0.2
        else:
            down = torch.randn(rank, layer.in_channels, *layer.kernel_size, generator=g) * 0.2
            up = torch.randn(layer.out_channels, rank, 1, 1, generator=g) * 0.2
        tensors.update(
            {
                f"{stem}.lora_down.weight": down,
                f"{stem}.lora_up.weight": up,
                f"{stem}.alpha": torch.tensor(alpha),
            }
        )
    save_file(tensors, str(path))
    return tensors
