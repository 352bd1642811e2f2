"""Loading a Stable-Diffusion-layout checkpoint (diffusers folders) from a local path or the hub cache.

The same code loads SD v1.4 (``model=sd14``), the shipped toy model (``model=toy``) and any
folder written by ``save_components``. A missing checkpoint ends in one line naming where we looked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from unlearn_exp.atomic import atomic_dir
from unlearn_exp.errors import UserError
from unlearn_exp.families import FAMILIES
from unlearn_exp.models.components import Components
from unlearn_exp.models.sd3 import load_sd3_folder

SUBFOLDERS = ("unet", "text_encoder", "tokenizer", "scheduler")  # SD v1 (the vae where it is used)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def resolve_checkpoint(path_or_id: str, need_vae: bool = True, parts: tuple[str, ...] | None = None) -> Path:
    """A local folder for ``path_or_id``: the folder itself, or its snapshot in the Hugging Face cache.
    ``parts``: the subfolders it must hold (default: SD v1's, with the VAE where ``need_vae``)."""
    parts = parts or SUBFOLDERS + (("vae",) if need_vae else ())
    patterns = ["model_index.json", *(f"{part}/*" for part in parts)]
    p = Path(os.path.expanduser(str(path_or_id)))
    if p.exists():
        missing = [s for s in parts if not (p / s).is_dir()]
        if missing:
            raise UserError(
                f"model folder '{p}' lacks the subfolder(s) {missing}: expected a diffusers layout"
            )
        return p
    looks_like_id = str(path_or_id).count("/") == 1 and not str(path_or_id).startswith((".", "/", "~"))
    if not looks_like_id:
        raise UserError(f"model weights not found: no folder at '{p}'. Set model.path to a diffusers folder.")
    from huggingface_hub import snapshot_download

    hf_home = os.environ.get("HF_HOME", "~/.cache/huggingface")
    try:
        return Path(snapshot_download(str(path_or_id), local_files_only=True, allow_patterns=patterns))
    except Exception:
        pass
    if not _offline():
        try:
            return Path(snapshot_download(str(path_or_id), allow_patterns=patterns))
        except Exception:
            pass
    raise UserError(
        f"model weights not found: '{path_or_id}' is neither a local folder nor in the Hugging Face cache "
        f"(HF_HOME={hf_home}); download it there (hf download {path_or_id}) or set "
        f"model.path=/path/to/{str(path_or_id).rsplit('/', 1)[-1]}"
    )


def load_pretrained(
    path_or_id: str,
    name: str = "model",
    resolution: int = 512,
    vae: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Components:
    root = resolve_checkpoint(path_or_id, need_vae=vae)
    try:
        unet = UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
        with open(root / "scheduler" / "scheduler_config.json") as f:
            scheduler_config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
        autoencoder = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype) if vae else None
    except (OSError, ValueError, json.JSONDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load model from '{root}': {first}") from e
    tokenizer.model_max_length = 77
    return Components(
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=scheduler_config,
        vae=autoencoder,
        resolution=resolution,
        name=name,
        source=str(path_or_id),
    ).freeze()


def load_sd3(
    path_or_id: str,
    name: str = "sd3",
    resolution: int = 1024,
    t5: bool = True,
    dtype: torch.dtype = torch.float32,
    vae: bool = True,
    text_length: int | None = None,
):
    """An SD3 diffusers folder (``model.family: sd3``), T5 left out where ``t5`` is false, the VAE where
    ``vae`` is (the toy MMDiT); ``text_length``: T5's tokens (None: 256)."""
    parts = FAMILIES["sd3"].parts_of({"t5": t5, "vae": vae})  # what models.families.required_parts gives
    root = resolve_checkpoint(path_or_id, parts=parts)
    try:
        comps = load_sd3_folder(root, name, resolution, t5, dtype, vae=vae, text_length=text_length)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load model from '{root}': {first}") from e
    comps.source = str(path_or_id)
    return comps


def save_components(components, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write a diffusers-layout folder that ``load_pretrained`` / ``load_sd3`` (and diffusers, given a
    VAE) can read."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        for sub, module in components.modules().items():
            module.save_pretrained(tmp / sub, safe_serialization=True)
            if dtype is not None:
                _recast_safetensors(tmp / sub, dtype)
        for sub, tokenizer in components.tokenizers().items():
            tokenizer.save_pretrained(tmp / sub)
        # the schedule exactly as the components carry it (a scheduler instance would add its defaults)
        (tmp / "scheduler").mkdir()
        sched = {"_class_name": components.scheduler_class, **components.scheduler_config}
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
        index = components.model_index()  # what diffusers reads to load the folder (none without a VAE)
        if index is not None:
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def _recast_safetensors(folder: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import load_file, save_file

    for f in folder.glob("*.safetensors"):
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(f).items()}
        save_file(tensors, f, metadata={"format": "pt"})
