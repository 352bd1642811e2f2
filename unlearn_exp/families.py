"""The model families, declared without torch: what validation, identities and the planner need to
know of a family before anything loads (docs/model_families.md).

A family is chosen by ``model.family`` (``conf/model/*.yaml``; absent means ``sd1``, so the SD v1
configs carry no new key). Its components class (``components``, built by ``models/loading.py``) provides the
operations every stage calls: ``tokenize``, ``condition``, ``denoise``, the latent path and the
schedulers. A method that runs on a family says so in its declaration (``families``); a cell that
pairs a method with a family it does not support is refused before any work.
"""

from __future__ import annotations

from dataclasses import dataclass

from unlearn_exp.errors import UserError


@dataclass(frozen=True)
class Family:
    """A model family: its diffusers folder layout, its denoiser and what that predicts."""

    name: str
    title: str
    parts: tuple[str, ...]  # the subfolders of its diffusers layout that hold its weights and config
    optional: tuple[tuple[str, str], ...]  # (part, the model key that turns it off)
    denoiser: str  # the part that denoises: unet | transformer
    prediction: str  # epsilon (noise) | flow (velocity, noise minus data)
    components: str  # "module:Class" of its components (documentation: models/loading.py builds them)
    samplers: tuple[str, ...]  # the sampling.scheduler values it runs

    def parts_of(self, model_cfg) -> tuple[str, ...]:
        """The parts a model of this family loads: the optional ones where their key is on."""
        off = {part for part, key in self.optional if not bool(_get(model_cfg, key, True))}
        return tuple(p for p in self.parts if p not in off)


def _get(cfg, key: str, default):
    try:
        value = cfg.get(key, default)
    except AttributeError:
        return default
    return default if value is None else value


FAMILIES: dict[str, Family] = {
    "sd1": Family(
        name="sd1",
        title="Stable Diffusion v1 (UNet, noise prediction, one CLIP text encoder)",
        parts=("unet", "text_encoder", "tokenizer", "scheduler", "vae"),
        optional=(("vae", "vae"),),
        denoiser="unet",
        prediction="epsilon",
        components="unlearn_exp.models.components:Components",
        samplers=("dpmsolver++", "pndm", "ddim"),
    ),
    "sd3": Family(
        name="sd3",
        title="Stable Diffusion 3 (MMDiT, flow matching, CLIP-L + CLIP-G + T5)",
        parts=(
            "transformer",
            "text_encoder",
            "text_encoder_2",
            "text_encoder_3",
            "tokenizer",
            "tokenizer_2",
            "tokenizer_3",
            "scheduler",
            "vae",
        ),
        optional=(("text_encoder_3", "t5"), ("tokenizer_3", "t5"), ("vae", "vae")),
        denoiser="transformer",
        prediction="flow",
        components="unlearn_exp.models.sd3:SD3Components",
        samplers=("flow_euler",),
    ),
}


def family_of(model_cfg) -> Family:
    """The family of a ``conf/model`` node (``model.family``; absent: ``sd1``)."""
    name = str(_get(model_cfg, "family", "sd1"))
    if name not in FAMILIES:
        raise UserError(f"model.family must be one of {sorted(FAMILIES)}, got '{name}'")
    return FAMILIES[name]


def required_parts(model_cfg) -> tuple[str, ...]:
    """The subfolders a pretrained model of ``model_cfg`` loads: its family's parts, less those turned
    off (SD v1 without a VAE, SD3 without T5)."""
    return family_of(model_cfg).parts_of(model_cfg)
