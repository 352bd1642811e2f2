"""Published unlearned checkpoints that replace a whole component (docs/methods.md 8.4).

- ``checkpoint=unet_folder``: any diffusers UNet folder (``config.json`` and
  ``diffusion_pytorch_model.safetensors``, or its shards and index), or a pipeline folder holding
  ``unet/``: the released pipelines of MACE, SafeGen and others, saved with ``save_pretrained`` (RECE
  saves a ``.pt`` of the whole UNet: ``checkpoint=esd``). On SD3 the same for the denoiser there, the
  transformer (``transformer/``). Every weight of this model's denoiser must be in it, with this
  model's architecture.
- ``checkpoint=advunlearn``: AdvUnlearn's robust CLIP text encoder (a transformers ``CLIPTextModel``
  folder such as its hub repository's ``nudity_unlearned/``, a pipeline folder holding
  ``text_encoder/``, or one file of its state dict, e.g. its training code's
  ``TextEncoder-<name>.pt``) replaces the model's text encoder; the UNet is untouched. On SD3 it
  replaces the CLIP-L tower (``text_encoder``, the same CLIP ViT-L/14 architecture), keeping SD3's text
  projection, CLIP-G and T5: a transfer, as AdvUnlearn publishes SD v1.4 encoders only. Key layouts of
  transformers 4 (``text_model.*``) and 5 (no prefix) are both read; the training code's wrapper
  (``text_encoder.text_model.*`` beside aliases of the same tensors) keeps only its CLIP model's keys,
  as AdvUnlearn's own loader does.

Both read ``.safetensors``; pickled weights (``.bin``, ``.pt``) are refused in one line unless
``checkpoint.allow_pickle_conversion=true`` (then read with ``torch.load(weights_only=True)`` and
converted once into a cached safetensors artifact). A partial or mismatched file is refused naming the
keys; a checkpoint is identified by its files' content (sha256).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from unlearn_exp.errors import UserError
from unlearn_exp.families import FAMILIES
from unlearn_exp.hashing import config_hash, file_sha256
from unlearn_exp.registry import UNLEARNING
from unlearn_exp.unlearning.config import AdvUnlearnCheckpointConfig, UNetFolderCheckpointConfig
from unlearn_exp.unlearning.weights import (
    PICKLE_SUFFIXES,
    check_state_dict,
    few_keys,
    load_unet_weights,
    read_safetensors,
    resolve_weight_file,
)

# config.json fields that decide whether a denoiser's weights fit this model's layers, by the family's
# denoiser (families.py): SD v1's UNet, SD3's transformer
ARCHITECTURE_FIELDS = {
    "unet": (
        "in_channels",
        "out_channels",
        "block_out_channels",
        "down_block_types",
        "up_block_types",
        "layers_per_block",
        "cross_attention_dim",
        "attention_head_dim",
    ),
    "transformer": (
        "in_channels",
        "out_channels",
        "patch_size",
        "num_layers",
        "attention_head_dim",
        "num_attention_heads",
        "joint_attention_dim",
        "caption_projection_dim",
        "pooled_projection_dim",
        "dual_attention_layers",
        "qk_norm",
    ),
}


def _component_folder(path: Path, sub: str, what: str) -> Path:
    """``path`` itself, or its ``sub/`` folder (a whole pipeline's folder)."""
    if not path.exists():
        raise UserError(f"{what}: not found: {path}")
    if path.is_dir() and not (path / "config.json").is_file() and (path / sub).is_dir():
        return path / sub
    return path


def _weight_files(
    folder: Path, stem: str, what: str, *, store, allow_pickle: bool, pickle_stem: str | None = None
) -> list[Path]:
    """The ``.safetensors`` weights of a ``save_pretrained`` folder: one file, or the shards its
    index names; pickled weights (``<pickle_stem or stem>*.bin``) only when ``allow_pickle``,
    converted."""
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
    pickles = sorted(folder.glob(f"{pickle_stem or stem}*.bin"))
    if pickles and allow_pickle:
        return [resolve_weight_file(p, store, allow_pickle_conversion=True) for p in pickles]
    if pickles:
        raise UserError(
            f"{what}: {folder} holds only pickle weights ({', '.join(p.name for p in pickles)}); "
            "set checkpoint.allow_pickle_conversion=true (read with torch.load(weights_only=True)) "
            "or convert them to safetensors"
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
    """``checkpoint=unet_folder``: every weight of the denoiser from its diffusers folder (SD v1: the
    UNet's, ``unet/``; SD3: the transformer's, ``transformer/``)."""
    s = UNetFolderCheckpointConfig.from_cfg(cfg)
    what = "checkpoint=unet_folder"
    part = FAMILIES[comps.family].denoiser
    title = {"unet": "UNet"}.get(part, part)
    folder = _component_folder(Path(str(s.path)).expanduser(), part, what)
    if not folder.is_dir():
        raise UserError(f"{what}: {folder} is not a folder (a single weight file: use checkpoint=esd)")
    conf_file = folder / "config.json"
    if not conf_file.is_file():
        raise UserError(f"{what}: {folder} has no config.json (not a diffusers {title} folder)")
    theirs = json.loads(conf_file.read_text())
    ours = dict(comps.denoiser.config)
    differ = [
        f"{k}={theirs.get(k)!r} (this model: {ours.get(k)!r})"
        for k in ARCHITECTURE_FIELDS[part]
        if k in theirs and _norm(theirs[k]) != _norm(ours.get(k))
    ]
    if differ:
        raise UserError(f"{what}: the folder's {title} is another architecture: {'; '.join(differ[:3])}")
    allow = s.allow_pickle_conversion
    files = _weight_files(folder, "diffusion_pytorch_model", what, store=store, allow_pickle=allow)
    tensors = {k.removeprefix(f"{part}."): v for k, v in _read_all(files, what).items()}
    missing = sorted(set(comps.denoiser.state_dict()) - set(tensors))
    if missing:
        raise UserError(
            f"{what}: the folder lacks {len(missing)} of this {title}'s weights ({few_keys(missing)}); "
            "a partial set of weights is a checkpoint=esd file"
        )
    changed = load_unet_weights(comps.denoiser, tensors, f"{what} '{folder}'")
    return _identity("unet_folder", files, n_tensors=len(changed))


@UNLEARNING.register("advunlearn")
def apply_advunlearn(comps, cfg, store, *, task_cfg, judge=None, sample_kwargs=None, logger=None) -> dict:
    """``checkpoint=advunlearn``: AdvUnlearn's text encoder replaces the model's."""
    s = AdvUnlearnCheckpointConfig.from_cfg(cfg)
    what = "checkpoint=advunlearn"
    path = _component_folder(Path(str(s.path)).expanduser(), "text_encoder", what)
    if path.is_dir():
        concepts = sorted(p.name for p in path.glob("*_unlearned") if (p / "config.json").is_file())
        if not (path / "config.json").is_file() and concepts:
            raise UserError(
                f"{what}: {path} holds one text encoder per concept ({', '.join(concepts)}): "
                f"name one, e.g. checkpoint.path={path / concepts[0]}"
            )
        allow = s.allow_pickle_conversion
        files = _weight_files(
            path, "model", what, pickle_stem="pytorch_model", store=store, allow_pickle=allow
        )
    elif path.suffix == ".safetensors" or path.suffix in PICKLE_SUFFIXES:
        files = [resolve_weight_file(path, store, allow_pickle_conversion=s.allow_pickle_conversion)]
    else:
        raise UserError(f"{what}: '{path.name}' is not a weight file (.safetensors, .pt) or a folder")
    tensors = _read_all(files, what)
    n = load_text_encoder_weights(comps.text_encoder, tensors, what)
    return _identity("advunlearn", files, n_tensors=n)


def text_encoder_keys(tensors: dict[str, torch.Tensor], own: Iterable[str]) -> dict[str, torch.Tensor]:
    """A text-encoder state dict in the key layout of ``own`` (the model's keys): AdvUnlearn's training
    wrapper (``text_encoder.text_model.*`` beside aliases of the same tensors) keeps its CLIP model's
    keys; ``text_model.`` is added or dropped as the installed transformers names them (4: with it,
    5: without); the position-id buffer (an ``arange``, saved by transformers 4 only) is left out."""
    wrapped = "text_encoder."
    if any(k.startswith(wrapped) for k in tensors):
        tensors = {k.removeprefix(wrapped): v for k, v in tensors.items() if k.startswith(wrapped)}
    prefix = "text_model." if any(k.startswith("text_model.") for k in own) else ""
    kept = {k.removeprefix("text_model."): v for k, v in tensors.items() if not k.endswith("position_ids")}
    return {prefix + k: v for k, v in kept.items()}


@torch.no_grad()
def load_text_encoder_weights(text_encoder, tensors: dict[str, torch.Tensor], what: str) -> int:
    """Copy a complete text-encoder state dict (any layout ``text_encoder_keys`` reads) into
    ``text_encoder``; every weight must be there with its shape (the position-id buffer and the text
    projection of a ``CLIPTextModelWithProjection`` excepted)."""
    own = text_encoder.state_dict()
    tensors = text_encoder_keys(tensors, own)
    check_state_dict(own, tensors, what, "text encoder", "is it another text encoder?")
    # the projection on the tower's pooled output (SD3's CLIP-L is a CLIPTextModelWithProjection) stays
    # where the file has none: AdvUnlearn's CLIPTextModel has none to give
    missing = [
        k
        for k in own
        if k not in tensors and not k.endswith("position_ids") and not k.startswith("text_projection.")
    ]
    if missing:
        raise UserError(f"{what}: the file lacks {len(missing)} text-encoder weight(s) ({few_keys(missing)})")
    for k, v in tensors.items():
        own[k].copy_(v.to(device=own[k].device, dtype=own[k].dtype))
    return len(tensors)


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, list | tuple) else v
