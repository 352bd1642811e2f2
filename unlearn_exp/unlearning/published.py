"""Published unlearned checkpoints that replace a whole component (docs/methods.md 8.4).

- ``checkpoint=unet_folder``: any diffusers UNet folder (``config.json`` and
  ``diffusion_pytorch_model.safetensors``, or its shards and index), or a pipeline folder holding
  ``unet/``: the released UNets of RECE, MACE, SafeGen and others, saved with ``save_pretrained``.
  Every weight of this model's UNet must be in it, with this model's architecture.
- ``checkpoint=advunlearn``: AdvUnlearn's robust CLIP text encoder (a transformers ``CLIPTextModel``
  folder with ``model.safetensors``, a pipeline folder holding ``text_encoder/``, or one
  ``.safetensors`` of its state dict) replaces the model's text encoder; the UNet is untouched.

Both load only ``.safetensors`` (a pickle is refused in one line), refuse a partial or mismatched file
naming the keys, and are identified by the files' content (sha256).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from unlearn_exp.errors import UserError
from unlearn_exp.registry import UNLEARNING
from unlearn_exp.store import config_hash, file_sha256
from unlearn_exp.unlearning.config import AdvUnlearnCheckpointConfig, UNetFolderCheckpointConfig
from unlearn_exp.unlearning.weights import check_state_dict, few_keys, load_unet_weights, read_safetensors

# config.json fields that decide whether a UNet's weights fit this model's layers
UNET_FIELDS = (
    "in_channels",
    "out_channels",
    "block_out_channels",
    "down_block_types",
    "up_block_types",
    "layers_per_block",
    "cross_attention_dim",
    "attention_head_dim",
)


def _component_folder(path: Path, sub: str, what: str) -> Path:
    """``path`` itself, or its ``sub/`` folder (a whole pipeline's folder)."""
    if not path.exists():
        raise UserError(f"{what}: not found: {path}")
    if path.is_dir() and not (path / "config.json").is_file() and (path / sub).is_dir():
        return path / sub
    return path


def _weight_files(folder: Path, stem: str, what: str) -> list[Path]:
    """The ``.safetensors`` weights of a ``save_pretrained`` folder: one file, or the shards its
    index names."""
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise UserError(f"{what}: unreadable shard index {index.name} ({e})") from None
        files = [folder / n for n in names]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise UserError(f"{what}: shard(s) {', '.join(absent)} named by {index.name} are missing")
        return files
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    pickles = [p.name for p in folder.glob(f"{stem}*.bin")]
    if pickles:
        raise UserError(
            f"{what}: {folder} holds only pickle weights ({', '.join(pickles)}); "
            "save it with save_pretrained(safe_serialization=True) or convert it to safetensors"
        )
    raise UserError(f"{what}: no {stem}.safetensors in {folder}")


def _read_all(files: list[Path], what: str) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(read_safetensors(f, f"{what} '{f.name}'"))
    return tensors


def _identity(method: str, files: list[Path], **extra: Any) -> dict[str, Any]:
    shas = [file_sha256(f) for f in files]
    return {
        "method": method,
        "beta": None,
        "source": "user",
        "id": config_hash({"method": method, "sha256": shas}),
        "files": [str(f) for f in files],
        "sha256": shas,
        **extra,
    }


@UNLEARNING.register("unet_folder")
def apply_unet_folder(comps, cfg, store, *, task_cfg, judge=None, sample_kwargs=None, logger=None) -> dict:
    """``checkpoint=unet_folder``: every UNet weight from a diffusers UNet folder."""
    s = UNetFolderCheckpointConfig.from_cfg(cfg)
    what = "checkpoint=unet_folder"
    folder = _component_folder(Path(str(s.path)).expanduser(), "unet", what)
    if not folder.is_dir():
        raise UserError(f"{what}: {folder} is not a folder (a single weight file: use checkpoint=esd)")
    conf_file = folder / "config.json"
    if not conf_file.is_file():
        raise UserError(f"{what}: {folder} has no config.json (not a diffusers UNet folder)")
    theirs = json.loads(conf_file.read_text())
    ours = dict(comps.unet.config)
    differ = [
        f"{k}={theirs.get(k)!r} (this model: {ours.get(k)!r})"
        for k in UNET_FIELDS
        if k in theirs and _norm(theirs[k]) != _norm(ours.get(k))
    ]
    if differ:
        raise UserError(f"{what}: the folder's UNet is another architecture: {'; '.join(differ[:3])}")
    files = _weight_files(folder, "diffusion_pytorch_model", what)
    tensors = _read_all(files, what)
    missing = sorted(set(comps.unet.state_dict()) - {k.removeprefix("unet.") for k in tensors})
    if missing:
        raise UserError(
            f"{what}: the folder lacks {len(missing)} of this UNet's weights ({few_keys(missing)}); "
            "a partial UNet is a checkpoint=esd file"
        )
    changed = load_unet_weights(comps.unet, tensors, f"{what} '{folder}'")
    return _identity("unet_folder", files, n_tensors=len(changed))


@UNLEARNING.register("advunlearn")
def apply_advunlearn(comps, cfg, store, *, task_cfg, judge=None, sample_kwargs=None, logger=None) -> dict:
    """``checkpoint=advunlearn``: AdvUnlearn's text encoder replaces the model's."""
    s = AdvUnlearnCheckpointConfig.from_cfg(cfg)
    what = "checkpoint=advunlearn"
    path = _component_folder(Path(str(s.path)).expanduser(), "text_encoder", what)
    if path.is_dir():
        files = _weight_files(path, "model", what)
    elif path.suffix == ".safetensors":
        files = [path]
    else:
        raise UserError(f"{what}: '{path.name}' is not a .safetensors file or a text-encoder folder")
    tensors = _read_all(files, what)
    n = load_text_encoder_weights(comps.text_encoder, tensors, what)
    return _identity("advunlearn", files, n_tensors=n)


@torch.no_grad()
def load_text_encoder_weights(text_encoder, tensors: dict[str, torch.Tensor], what: str) -> int:
    """Copy a complete text-encoder state dict (``text_model.*``; a ``text_encoder.`` prefix is
    dropped) into ``text_encoder``; every weight must be there with its shape (the position-id
    buffer excepted: ``save_pretrained`` leaves it out)."""
    tensors = {k.removeprefix("text_encoder."): v for k, v in tensors.items()}
    own = text_encoder.state_dict()
    check_state_dict(own, tensors, what, "text encoder", "is it another text encoder?")
    missing = [k for k in own if k not in tensors and not k.endswith("position_ids")]
    if missing:
        raise UserError(f"{what}: the file lacks {len(missing)} text-encoder weight(s) ({few_keys(missing)})")
    for k, v in tensors.items():
        own[k].copy_(v.to(device=own[k].device, dtype=own[k].dtype))
    return len(tensors)


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, list | tuple) else v
