"""Model loading per scale: ``load_model(cfg.model)`` returns ``Components`` for sd14, toy or tiny."""

from __future__ import annotations

from pathlib import Path

import torch

from unlearn_exp.errors import UserError
from unlearn_exp.models.components import Components, TokenizedPrompts
from unlearn_exp.models.pretrained import load_pretrained, save_components
from unlearn_exp.models.tiny import build_tiny

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

__all__ = ["Components", "TokenizedPrompts", "load_model", "load_pretrained", "save_components", "build_tiny"]


REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_local_path(path: str) -> str:
    """A relative folder is looked up from the working directory, then from the repository root
    (so shipped paths such as ``unlearn_exp/toy/weights/model`` work from any directory)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists() or not (REPO_ROOT / p).exists():
        return str(p) if (p.exists() or path.startswith((".", "/", "~"))) else path
    return str(REPO_ROOT / p)


def load_model(model_cfg) -> Components:
    """Build or load the model a ``conf/model/*.yaml`` describes (``source: tiny | pretrained``)."""
    source = model_cfg.get("source", "pretrained")
    dtype_name = model_cfg.get("dtype", "float32")
    device = model_cfg.get("device", "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype_name == "auto":  # half precision where it is fast, fp32 on the CPU
        dtype_name = "float16" if str(device).startswith("cuda") else "float32"
    if dtype_name not in DTYPES:
        raise UserError(f"model.dtype must be one of {sorted(DTYPES)}, got '{dtype_name}'")
    if source == "tiny":
        comps = build_tiny(
            seed=int(model_cfg.get("seed", 0)),
            resolution=int(model_cfg.get("resolution", 32)),
            vae=bool(model_cfg.get("vae", True)),
        )
    elif source == "pretrained":
        path = model_cfg.get("path")
        if not path:
            raise UserError(
                f"model '{model_cfg.get('name')}' needs model.path (a diffusers folder or hub id)"
            )
        comps = load_pretrained(
            resolve_local_path(str(path)),
            name=str(model_cfg.get("name", "model")),
            resolution=int(model_cfg.get("resolution", 512)),
            vae=bool(model_cfg.get("vae", True)),
        )
    else:
        raise UserError(f"model.source must be 'tiny' or 'pretrained', got '{source}'")
    comps.name = str(model_cfg.get("name", comps.name))
    if torch.device(device) != comps.device:
        comps.to(device=device)
    if DTYPES[dtype_name] != comps.dtype:
        comps.to(dtype=DTYPES[dtype_name])
    return comps
