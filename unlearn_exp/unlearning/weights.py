"""Reading weight files from users and writing our own: safetensors, checked against the model.

Published checkpoints (docs/methods.md 5.6, 8.1, 8.2) come as safetensors or, for older releases, as
pickled ``.pt``/``.ckpt`` files. Pickles are read only on an explicit opt-in
(``checkpoint.allow_pickle_conversion=true``), with ``torch.load(weights_only=True)``, and converted
once into a cached safetensors artifact. Every state dict is checked against the model before
anything is changed: wrong keys or shapes end in one line naming a few offending keys.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from unlearn_exp.atomic import atomic_file
from unlearn_exp.checks import PICKLE_SUFFIXES, pickle_refusal
from unlearn_exp.errors import UserError
from unlearn_exp.hashing import file_sha256
from unlearn_exp.store import ArtifactStore

LDM_PREFIX = "model.diffusion_model."


def few_keys(keys: Iterable[str], n: int = 4) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def read_safetensors(path: str | Path, what: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; an empty, truncated or garbage file is one ``UserError``."""
    path = Path(path)
    what = what or f"'{path.name}'"
    if not path.is_file():
        raise UserError(f"{what}: file not found: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"{what} ({path}) is empty: re-download or rebuild it")
    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError, OSError, ValueError: a damaged file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(
            f"{what} ({path}) is not a readable safetensors file ({first}): re-download or rebuild it"
        ) from None


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None
) -> Path:
    """Atomic safetensors write of contiguous CPU tensors, the same bytes in any process: safetensors
    writes the header's metadata from a hash map (in either order from one process to the next), so
    ``metadata`` goes in as one JSON entry beside nothing else. Tensors sharing memory (aliases kept by
    a pickle) are each written whole."""
    clean, storages = {}, set()
    for k, v in tensors.items():  # tensors that share memory (a pickle's aliases) are written apart
        v = v.detach().to("cpu").contiguous()
        ptr = v.untyped_storage().data_ptr()
        clean[k] = v.clone() if ptr in storages else v
        storages.add(ptr)
    header = {"unlearn_exp": json.dumps(metadata, sort_keys=True)} if metadata else {"format": "pt"}
    with atomic_file(path) as tmp:
        save_file(clean, str(tmp), metadata=header)
    return Path(path)


def _unwrap(obj) -> dict[str, torch.Tensor]:
    """The tensor dict inside a loaded pickle (``state_dict``/``params``/``model`` wrappers are common)."""
    for _ in range(3):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            for k in ("state_dict", "params", "model", "module", "unet"):
                if isinstance(obj.get(k), dict):
                    obj = obj[k]
                    break
            else:
                break
    if not isinstance(obj, dict):
        raise UserError(f"expected a dict of tensors, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def unpickle_refusal(p: Path, exc: Exception) -> str:
    """A pickle that holds more than tensors: what it references (torch names the global), and what
    the project offers instead of torch's own advice to unpickle it anyway."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    what = next((ln for ln in lines if "global" in ln.lower()), lines[-1] if lines else type(exc).__name__)
    return (
        f"'{p.name}' holds more than tensors ({what[:160]}), and this project never unpickles code: "
        "where you trust the file, save its state dict with safetensors.torch.save_file and give that file"
    )


def resolve_weight_file(
    path: str | Path, store: ArtifactStore | None, *, allow_pickle_conversion: bool = False
) -> Path:
    """A safetensors file for ``path``: the file itself, or its cached conversion from a pickle."""
    p = Path(str(path)).expanduser()
    if p.is_dir():
        found = sorted(p.glob("*.safetensors"))
        if len(found) != 1:
            raise UserError(
                f"checkpoint folder '{p}' must hold exactly one .safetensors file, found {len(found)}"
            )
        p = found[0]
    if not p.is_file():
        raise UserError(f"checkpoint file not found: '{p}'")
    if p.suffix == ".safetensors":
        return p
    if p.suffix not in PICKLE_SUFFIXES:
        raise UserError(f"checkpoint '{p.name}': unsupported file type '{p.suffix}' (use .safetensors)")
    if not allow_pickle_conversion:
        raise UserError(pickle_refusal(p))

    def build(tmp: Path) -> None:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses arbitrary objects
            raise UserError(unpickle_refusal(p, e)) from None
        tensors = _unwrap(obj)
        if not tensors:
            raise UserError(f"'{p.name}' holds no tensors")
        save_safetensors(tensors, tmp / (p.stem + ".safetensors"), {"converted_from": p.name})

    key = {"sha256": file_sha256(p), "name": p.name}
    if store is None:
        raise UserError("converting a pickle checkpoint needs an artifact store")
    folder = store.get_or_build("unlearning/converted", key, build)
    return folder / (p.stem + ".safetensors")


# ----------------------------------------------------------------------------- full / partial UNet weights
def _ldm_to_diffusers(tensors: dict[str, torch.Tensor], unet) -> dict[str, torch.Tensor]:
    """CompVis/LDM UNet names (``model.diffusion_model.*``, a full model) -> diffusers UNet names."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ldm = {k: v for k, v in tensors.items() if k.startswith(LDM_PREFIX)}
    try:
        out = convert_ldm_unet_checkpoint(ldm, {**unet.config, "sample_size": unet.config.sample_size})
    except Exception as e:
        raise UserError(
            "an LDM-format UNet checkpoint must be complete (all of model.diffusion_model.*) to be "
            f"converted; conversion failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e
    if len(out) != len(ldm):  # the converter infers blocks from the keys present and drops the rest
        raise UserError(
            "an LDM-format UNet checkpoint must be complete (all of model.diffusion_model.*) to be "
            f"converted; only {len(out)} of its {len(ldm)} UNet tensors map onto this model"
        )
    return out


def check_unet_state(unet, tensors: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Map a (partial) UNet state dict onto ``unet``'s names; UserError on unknown keys or shapes."""
    if any(k.startswith(LDM_PREFIX) for k in tensors):
        tensors = _ldm_to_diffusers(tensors, unet)
    # a pipeline's denoiser prefix: SD v1's unet., SD3's transformer.
    tensors = {k.removeprefix("unet.").removeprefix("transformer."): v for k, v in tensors.items()}
    check_state_dict(unet.state_dict(), tensors, what, "UNet", "is it for another architecture?")
    return tensors


def check_state_dict(own: dict, tensors: dict[str, torch.Tensor], what: str, part: str, hint: str) -> None:
    """Every key of ``tensors`` names a tensor of ``own`` (a module's state dict) of the same shape;
    else one ``UserError`` naming a few offending keys."""
    unknown = [k for k in tensors if k not in own]
    if unknown:
        raise UserError(
            f"{what}: {len(unknown)} key(s) are not in this model's {part} ({few_keys(unknown)}); {hint}"
        )
    bad = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in tensors.items()
        if v.shape != own[k].shape
    ]
    if bad:
        raise UserError(f"{what}: shape mismatch for {len(bad)} key(s): {few_keys(bad, 3)}")


@torch.no_grad()
def load_unet_weights(unet, tensors: dict[str, torch.Tensor], what: str) -> list[str]:
    """Copy a checked (partial) state dict into ``unet`` in place; returns the changed names."""
    tensors = check_unet_state(unet, tensors, what)
    params = dict(unet.named_parameters())
    buffers = dict(unet.named_buffers())
    for k, v in tensors.items():
        target = params.get(k, buffers.get(k))
        target.copy_(v.to(device=target.device, dtype=target.dtype))
    return sorted(tensors)


# ----------------------------------------------------------------------------- LoRA files
_LORA_SUFFIX = re.compile(
    r"^(?P<module>.+?)\.(?:(?P<peft>lora_[AB])(?:\.[^.]+)?\.weight|lora\.(?P<old>down|up)\.weight|"
    r"(?P<alpha>alpha)|lora_magnitude_vector)$"
)
_PROCESSOR = re.compile(r"\.processor\.(to_[qkv]|to_out)_lora$")


def check_lora_state(unet, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Every LoRA key must name a Linear/Conv layer of ``unet`` with matching in/out sizes."""
    modules = dict(unet.named_modules())
    unknown, bad, n_lora = [], [], 0
    for key, v in tensors.items():
        name = key.removeprefix("unet.").removeprefix("transformer.")
        if key.startswith("text_encoder."):
            unknown.append(key)
            continue
        m = _LORA_SUFFIX.match(name)
        if m is None:
            unknown.append(key)
            continue
        module_name = _PROCESSOR.sub(lambda g: "." + g.group(1).replace("to_out", "to_out.0"), m["module"])
        layer = modules.get(module_name)
        if layer is not None and hasattr(layer, "base_layer"):  # already wrapped by peft
            layer = layer.base_layer
        if not isinstance(layer, torch.nn.Linear | torch.nn.Conv2d):
            unknown.append(key)
            continue
        if m["alpha"] is not None:
            continue
        n_lora += 1
        down = m["peft"] == "lora_A" or m["old"] == "down"
        if isinstance(layer, torch.nn.Linear):
            want = layer.in_features if down else layer.out_features
            got = v.shape[1] if down else v.shape[0]
        else:
            want = layer.in_channels if down else layer.out_channels
            got = v.shape[1] if down else v.shape[0]
        if v.dim() < 2 or got != want:
            bad.append(f"{key} {tuple(v.shape)}")
    if unknown:
        raise UserError(
            f"{what}: {len(unknown)} key(s) match no UNet layer of this model ({few_keys(unknown)}); "
            "is the LoRA for another architecture?"
        )
    if bad:
        raise UserError(f"{what}: LoRA shapes do not fit this model's layers: {few_keys(bad, 3)}")
    if n_lora == 0:
        raise UserError(f"{what}: no LoRA weights found in the file")


def load_lora_file(unet, path: Path, adapter_name: str, family: str = "sd1") -> None:
    """Load one LoRA file (peft or older diffusers key format) into the denoiser (``unet``, or SD3's
    transformer for ``family`` sd3) as a named adapter."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    check_lora_state(unet, read_safetensors(path, f"LoRA '{path.name}'"), f"LoRA '{path.name}'")
    if family == "sd3":
        state, metadata = StableDiffusion3Pipeline.lora_state_dict(str(path), return_lora_metadata=True)
        StableDiffusion3Pipeline.load_lora_into_transformer(
            state, unet, adapter_name=adapter_name, metadata=metadata
        )
    else:
        state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
            str(path), return_lora_metadata=True
        )
        StableDiffusionPipeline.load_lora_into_unet(
            state, alphas, unet, adapter_name=adapter_name, metadata=metadata
        )
    n_loaded = sum(1 for n, _ in unet.named_parameters() if f".{adapter_name}." in n)
    if n_loaded == 0:
        raise UserError(f"LoRA '{path.name}': no adapter weights were loaded into the UNet")
