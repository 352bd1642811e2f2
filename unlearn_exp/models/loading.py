"""``load_model(cfg.model)``: the ``Components`` a ``conf/model/*.yaml`` describes (sd14, toy or tiny)."""

from __future__ import annotations

import torch

from unlearn_exp.errors import UserError
from unlearn_exp.families import family_of
from unlearn_exp.identity import model_identity, resolved_device, resolved_dtype
from unlearn_exp.models.components import Components
from unlearn_exp.models.pretrained import load_pretrained, load_sd3
from unlearn_exp.models.sd3 import build_tiny_sd3
from unlearn_exp.models.tiny import build_tiny
from unlearn_exp.paths import resolve_local_path

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_model(model_cfg) -> Components:
    """Build or load the model a ``conf/model/*.yaml`` describes (``source: tiny | pretrained``) in its
    family (``model.family``: sd1 or sd3, ``unlearn_exp/families.py``)."""
    source = model_cfg["source"]
    device = resolved_device(model_cfg)
    dtype_name = resolved_dtype(model_cfg)  # auto: half precision where it is fast, fp32 on the CPU
    if dtype_name not in DTYPES:
        raise UserError(f"model.dtype must be one of {sorted(DTYPES)}, got '{dtype_name}'")
    sd3 = family_of(model_cfg).name == "sd3"
    if source == "tiny":
        seed, resolution = int(model_cfg["seed"]), int(model_cfg["resolution"])
        if sd3:
            comps = build_tiny_sd3(seed=seed, resolution=resolution, t5=bool(model_cfg["t5"]))
        else:
            comps = build_tiny(seed=seed, resolution=resolution, vae=bool(model_cfg["vae"]))
    elif source == "pretrained":
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a "Loading weights" bar per model load says nothing useful
        path = model_cfg["path"]
        if not path:
            raise UserError(f"model '{model_cfg['name']}' needs model.path (a diffusers folder or hub id)")
        name, resolution = str(model_cfg["name"]), int(model_cfg["resolution"])
        if sd3:  # straight in the dtype it runs in: SD3 with T5-XXL is 15 GB in float16, 30 in float32
            comps = load_sd3(
                resolve_local_path(str(path)),
                name,
                resolution,
                t5=bool(model_cfg["t5"]),
                dtype=DTYPES[dtype_name],
                vae=bool(model_cfg["vae"]),
                text_length=model_cfg.get("text_length"),
            )
        else:
            comps = load_pretrained(
                resolve_local_path(str(path)), name=name, resolution=resolution, vae=bool(model_cfg["vae"])
            )
    else:
        raise UserError(f"model.source must be 'tiny' or 'pretrained', got '{source}'")
    comps.name = str(model_cfg["name"])
    if torch.device(device) != comps.device:
        comps.to(device=device)
    if DTYPES[dtype_name] != comps.dtype:
        comps.to(dtype=DTYPES[dtype_name])
    comps.identity = model_identity(model_cfg)  # by content: the same weights anywhere, one identity
    return comps
