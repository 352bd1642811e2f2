"""SPM: one-dimensional adapters ("semi-permeable membranes", Lyu et al., CVPR 2024; docs/methods.md 8.3),
loaded from SPM's published safetensors files and fused into the UNet.

SPM's file holds, for every ``Linear`` and ``Conv2d`` inside the UNet's ``Transformer2DModel`` blocks,
``lora_unet_<module path, dots as underscores>.lora_down.weight`` (rank r, 1 for SPM),
``.lora_up.weight`` and ``.alpha``; the adapted layer computes ``W x + m (alpha / r) up(down(x))``.
A ``Conv2d``'s ``down`` has the layer's kernel and ``up`` is 1x1, so the sum is one convolution whose
kernel is ``W + m (alpha / r) up . down``: we fuse it into the weights (``checkpoint.multiplier`` =
``m``). Departure: SPM's inference also scales ``m`` per prompt by its similarity to the erased
concept ("facilitated transport"); here ``m`` is fixed.

A file that misses any layer's tensors, names a layer this UNet does not have, or has other shapes is
refused in one line.
"""

from __future__ import annotations

from typing import Any

import torch

from unlearn_exp.errors import UserError
from unlearn_exp.hashing import file_sha256
from unlearn_exp.registry import UNLEARNING
from unlearn_exp.unlearning.config import SPMCheckpointConfig

PREFIX = "lora_unet"
PARTS = ("lora_down.weight", "lora_up.weight", "alpha")


def spm_layers(unet) -> dict[str, torch.nn.Module]:
    """SPM's key stem of every layer it adapts: each Linear/Conv2d inside a Transformer2DModel."""
    out = {}
    for name, module in unet.named_modules():
        if type(module).__name__ != "Transformer2DModel":
            continue
        for child_name, child in module.named_modules():
            if isinstance(child, torch.nn.Linear | torch.nn.Conv2d) and child_name:
                out[f"{PREFIX}.{name}.{child_name}".replace(".", "_")] = child
    return out


def spm_delta(down: torch.Tensor, up: torch.Tensor, scale: float, layer: torch.nn.Module) -> torch.Tensor:
    """``scale * up . down`` in the shape of ``layer.weight``."""
    w = layer.weight
    if isinstance(layer, torch.nn.Linear):
        if down.shape[1] != w.shape[1] or up.shape[0] != w.shape[0] or up.shape[1] != down.shape[0]:
            raise ValueError(f"down {tuple(down.shape)} / up {tuple(up.shape)} for weight {tuple(w.shape)}")
        return scale * (up.double() @ down.double())
    if down.ndim != 4 or up.ndim != 4 or up.shape[2:] != (1, 1):
        raise ValueError(f"conv adapter down {tuple(down.shape)} / up {tuple(up.shape)}")
    r = down.shape[0]
    if down.shape[1:] != w.shape[1:] or up.shape[0] != w.shape[0] or up.shape[1] != r:
        raise ValueError(f"down {tuple(down.shape)} / up {tuple(up.shape)} for weight {tuple(w.shape)}")
    return scale * (up[:, :, 0, 0].double() @ down.reshape(r, -1).double()).reshape(w.shape)


def fuse_spm(unet, tensors: dict[str, torch.Tensor], multiplier: float, what: str) -> int:
    """Add every adapter into its layer's weight; refuse partial or mismatched files (one line)."""
    layers = spm_layers(unet)
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    unknown = sorted(s for s in stems if s not in layers)
    if unknown:
        raise UserError(
            f"{what} names {len(unknown)} layer(s) this UNet does not have (e.g. {', '.join(unknown[:2])}): "
            "an SPM file for another architecture?"
        )
    missing = sorted(s for s in layers if any(f"{s}.{p}" not in tensors for p in PARTS))
    if missing:
        raise UserError(
            f"{what} is partial: {len(missing)} of {len(layers)} adapted layers lack lora_down/lora_up/alpha "
            f"(e.g. {missing[0]})"
        )
    deltas = {}
    for stem, layer in layers.items():
        down, up = tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"]
        alpha = float(tensors[f"{stem}.alpha"])
        rank = down.shape[0]
        scale = float(multiplier) * (alpha if alpha else rank) / rank
        try:
            deltas[stem] = spm_delta(down, up, scale, layer)
        except ValueError as e:
            raise UserError(f"{what}: layer {stem} does not fit this UNet ({e})") from None
    with torch.no_grad():
        for stem, layer in layers.items():
            layer.weight.add_(deltas[stem].to(layer.weight.dtype))
    return len(layers)


@UNLEARNING.register("spm")
def apply_spm(comps, cfg, store, *, task_cfg, judge=None, sample_kwargs=None, logger=None) -> dict[str, Any]:
    """``checkpoint=spm``: load SPM's published adapter file (``checkpoint.path``) into the UNet."""
    from unlearn_exp.unlearning.weights import read_safetensors, resolve_weight_file

    s = SPMCheckpointConfig.from_cfg(cfg)  # refuses a missing path, among others
    f = resolve_weight_file(s.path, store, allow_pickle_conversion=s.allow_pickle_conversion)
    multiplier = s.multiplier
    n = fuse_spm(comps.unet, read_safetensors(f), multiplier, f"SPM checkpoint '{f.name}'")
    sha = file_sha256(f)
    return {
        "method": "spm",
        "beta": None,
        "source": "user",
        "id": f"{sha[:16]}x{multiplier:g}",
        "files": [str(f)],
        "sha256": [sha],
        "multiplier": multiplier,
        "n_layers": n,
    }
