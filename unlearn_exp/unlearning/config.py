"""The settings of each unlearning method (``conf/checkpoint/*.yaml``): one typed dataclass per method,
its group's schema and the object its loader receives (``unlearn_exp/settings.py``). No torch.

The trained checkpoints' identities hash the composed ``checkpoint`` node as written (a ``1000``
stays an int there); the typed objects carry the converted values the code computes with."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from unlearn_exp.checks import PRECISIONS, Checks
from unlearn_exp.settings import Settings, choice, declare, listed, number, setting

ESD_VARIANTS = ("esd-u", "esd-x", "esd-x-strict", "esd-all", "esd-self")


class DUOCondition(StrEnum):
    """The text condition of DUO's preference term: ``null`` (DUO: the empty prompt) or ``unsafe``
    (each pair's unsafe prompt; a departure, docs/departures.md)."""

    null = "null"
    unsafe = "unsafe"


class ESDSampler(StrEnum):
    """Which UNet samples ESD's ``x_t``: the frozen ``original`` (docs/methods.md 8.1) or the
    ``trained`` copy (the published script)."""

    original = "original"
    trained = "trained"


@dataclass
class OriginalCheckpointConfig(Settings):
    """``conf/checkpoint/original.yaml``: the model as loaded."""

    GROUP = "checkpoint"
    method: str = setting("the method's registered name: original (the model as loaded, no unlearning)")
    beta: Any = number(lo=0, strict=True, optional=True, help="a label only: the results' beta column")
    path: Any = setting("not read: the model is used as loaded (null)")


@dataclass
class PairSamplingConfig:
    """How DUO's pair images are sampled (null keeps the cell's sampler setting)."""

    scheduler: Any = setting("scheduler of the pair images (DUO: pndm); null: the cell's sampler")
    steps: Any = setting("sampling steps of the pair images (DUO: 50); null: the cell's")
    guidance_scale: Any = setting(
        "CFG scale of the pair images and of the SDEdit step (DUO: 7.5); null: the cell's"
    )


@dataclass
class DUOCheckpointConfig(Settings):
    """``conf/checkpoint/duo.yaml`` (docs/methods.md 5)."""

    GROUP = "checkpoint"
    method: str = setting("the method's registered name: duo (docs/methods.md 5)")
    beta: Any = number(
        lo=0,
        strict=True,
        help="DPO beta trained for (with path: a label); lr and lambda scale with it (docs/methods.md 5.4)",
    )
    path: Any = setting(
        "LoRA file or list of files loaded instead of training; null: train and cache (docs/methods.md 5.5)"
    )
    adapter_weights: Any = setting(
        "one weight per LoRA file of path, as DUO's set_adapters; null: 1 each (docs/methods.md 5.5)"
    )
    filter: Any = setting(
        "judge profile checking the pairs (task.duo_filter), never the evaluation judge (docs/methods.md 5.1)"
    )
    allow_pickle_conversion: bool = setting(
        "pickled .pt/.pth/.ckpt/.bin are read only when true (torch.load weights_only), converted once"
    )
    lr_base: Any = number(
        lo=0, strict=True, help="lr = lr_base * 100 / beta (DUO: 3e-4; docs/methods.md 5.4)"
    )
    lambda_base: Any = number(lo=0, help="lambda = lambda_base * beta / 100 (DUO: 1e6; docs/methods.md 5.4)")
    lr_override: Any = number(
        lo=0,
        strict=True,
        optional=True,
        help="lr used instead of the scaled one; null: scaled (docs/design.md 2)",
    )
    lambda_override: Any = number(
        lo=0, optional=True, help="lambda used instead of the scaled one; null: scaled (docs/design.md 2)"
    )
    beta_scale: Any = number(
        lo=0,
        strict=True,
        help="beta / beta_scale is the beta of the loss and of lr/lambda; 1: the paper (docs/methods.md 5.4)",
    )
    beta_map: Any = setting(
        "[paper beta, beta] pairs, linear in log(beta) between them; null: the paper (docs/toy.md 3)"
    )
    steps: Any = number(
        int,
        lo=1,
        optional=True,
        help="optimiser steps per adapter; null: each adapter's steps from the recipe",
    )
    batch: int = number(
        int, lo=1, help="pairs per optimiser step (DUO: 1 per GPU x 4 GPUs; docs/methods.md 5.4)"
    )
    rank: int = number(int, lo=1, help="LoRA rank r (DUO: 32; docs/methods.md 5.2)")
    alpha: Any = number(lo=0, strict=True, help="LoRA alpha (DUO: 32; docs/methods.md 5.2)")
    init_lora_weights: Any = setting(
        "peft's init_lora_weights: a name (DUO: gaussian) or a bool (docs/methods.md 5.2)"
    )
    target_modules: list[str] = listed(
        help="UNet modules given a LoRA (DUO: self-attention only; docs/methods.md 5.2)"
    )
    condition: DUOCondition = setting(
        "text condition of the preference term: null (DUO: the empty prompt) or unsafe (docs/departures.md)"
    )
    train_resolution: Any = number(
        int,
        lo=8,
        optional=True,
        help="side of the pair images in training; null: the model's (DUO's SD3 script: 512; methods.md 5.8)",
    )
    text_length: Any = number(
        int,
        lo=1,
        optional=True,
        help="T5 tokens of the training prompts on SD3; null: the model's (DUO's SD3 script: 77; 5.8)",
    )
    t_min: int = number(
        int, lo=1, help="timesteps are drawn from {t_min-1, ..., t_max-1} (DUO: 1; docs/methods.md 5.3)"
    )
    t_max: int = number(
        int, lo=1, help="timesteps are drawn from {t_min-1, ..., t_max-1} (DUO: 750; docs/methods.md 5.3)"
    )
    seed: int = number(int, seed=True, help="training seed (DUO: 42)")
    weight_decay: Any = number(lo=0, help="AdamW weight decay (DUO: 0.01; docs/methods.md 5.4)")
    grad_clip: Any = number(
        lo=0, strict=True, optional=True, help="gradient-norm clip (DUO: 1.0); null: no clipping"
    )
    checkpoint_every: int = number(
        int, lo=1, help="steps between Lightning checkpoints, for resuming an interrupted run"
    )
    precision: str = choice(
        *PRECISIONS, help="training precision; auto: 16-mixed on GPU, 32-true on CPU (docs/methods.md 13)"
    )
    max_tries: int = number(
        int,
        lo=1,
        help="samples per pair image before the pair set build stops with an error (docs/methods.md 5.1)",
    )
    pair_batch: int = number(int, lo=1, help="images per sampler call while sampling the pairs")
    pair_sampling: PairSamplingConfig = setting(
        "how the pair images are sampled (DUO: PNDM, 50 steps, CFG 7.5; docs/methods.md 5.1)"
    )
    recipes: Any = setting(
        "recipe per task name ({adapters: [...]}); a task's duo_recipe replaces it (docs/methods.md 5.1)"
    )

    def rules(self, c: Checks) -> None:
        paths = self.path if isinstance(self.path, list) else [self.path]
        if self.path and self.adapter_weights and len(self.adapter_weights) != len(paths):
            c.fail(
                f"checkpoint.adapter_weights has {len(self.adapter_weights)} entries "
                f"for {len(paths)} LoRA files"
            )
        if self.t_min > self.t_max:
            c.fail(f"checkpoint.t_min ({self.t_min}) must not exceed checkpoint.t_max ({self.t_max})")
        beta_map(c, self.beta_map, self.beta)


def beta_map(c: Checks, table: Any, beta: Any) -> None:
    """``checkpoint.beta_map``: null, or [paper beta, beta] pairs of positive numbers that cover
    ``beta`` (read by ``unlearning.duo.effective_beta``)."""
    if table is None:
        return
    if (
        not isinstance(table, list)
        or not table
        or not all(isinstance(p, list | tuple) and len(p) == 2 for p in table)
    ):
        c.fail(f"checkpoint.beta_map must be a list of [paper beta, beta] pairs, got '{table}'")
        return
    before = len(c.problems)
    for i, (paper, toy) in enumerate(table):
        c.number(f"checkpoint.beta_map[{i}][0]", paper, lo=0, strict=True)
        c.number(f"checkpoint.beta_map[{i}][1]", toy, lo=0, strict=True)
    if len(c.problems) > before:
        return
    keys = sorted(float(p) for p, _ in table)
    if isinstance(beta, int | float) and not isinstance(beta, bool) and not keys[0] <= beta <= keys[-1]:
        c.fail(f"checkpoint.beta={beta:g} is outside checkpoint.beta_map ({keys[0]:g}-{keys[-1]:g})")


@dataclass
class ESDCheckpointConfig(Settings):
    """``conf/checkpoint/esd.yaml`` (docs/methods.md 8.1)."""

    GROUP = "checkpoint"
    method: str = setting("the method's registered name: esd (docs/methods.md 8.1)")
    beta: Any = number(lo=0, strict=True, optional=True, help="a label only (ESD has no beta); null")
    path: Any = setting("UNet weights (a full or partial state dict) loaded instead of training; null: train")
    allow_pickle_conversion: bool = setting(
        "pickled .pt/.pth/.ckpt/.bin are read only when true (torch.load weights_only), converted once"
    )
    variant: str = choice(
        *ESD_VARIANTS,
        help="what trains: esd-u all but attn2, esd-x attn2, esd-x-strict its k/v, esd-all, esd-self attn1",
    )
    concept: Any = setting(
        "the concept prompt: a string or {task name: string}; a task's esd_concept overrides it"
    )
    steps: int = number(int, lo=1, help="training iterations (original script: 1000; docs/methods.md 8.1)")
    lr: Any = number(lo=0, strict=True, help="Adam learning rate (original script: 1e-5)")
    eta: Any = number(lo=0, help="negative guidance of the target (original script: 1; current script: 2)")
    start_guidance: Any = number(lo=0, help="CFG scale of the partial sample that builds x_t (ESD: 3)")
    ddim_steps: int = number(int, lo=1, help="DDIM steps of the partial sample that builds x_t (ESD: 50)")
    batch: int = number(int, lo=1, help="x_t samples per optimiser step (ESD: 1)")
    sample_with: ESDSampler = setting(
        "which UNet samples x_t: the frozen original (docs/methods.md 8.1) or the trained copy"
    )
    seed: int = number(int, seed=True, help="training seed")
    grad_clip: Any = number(lo=0, strict=True, optional=True, help="gradient-norm clip; null: no clipping")
    checkpoint_every: int = number(
        int, lo=1, help="steps between Lightning checkpoints, for resuming an interrupted run"
    )
    precision: str = choice(
        *PRECISIONS, help="training precision; auto: 16-mixed on GPU, 32-true on CPU (docs/methods.md 13)"
    )


@dataclass
class UCECheckpointConfig(Settings):
    """``conf/checkpoint/uce.yaml`` (docs/methods.md 8.2)."""

    GROUP = "checkpoint"
    method: str = setting("the method's registered name: uce (docs/methods.md 8.2)")
    beta: Any = number(lo=0, strict=True, optional=True, help="a label only (UCE has no beta); null")
    path: Any = setting(
        "the edited weights (safetensors, docs/methods.md 8.2) loaded instead of editing; null: edit"
    )
    allow_pickle_conversion: bool = setting(
        "pickled .pt/.pth/.ckpt/.bin are read only when true (torch.load weights_only), converted once"
    )
    erase: Any = setting("concepts to erase: a list or {task name: list}; a task's uce_erase overrides it")
    guide: Any = setting(
        'guide concept: one string or a list, one per erased concept; "" = concept type object'
    )
    preserve: Any = setting("concepts to preserve (a list, or {task name: list}); []: none")
    lamb: Any = number(
        lo=0, help="lamb, the weight of the old weights in the closed form (UCE: 0.5; docs/methods.md 8.2)"
    )
    erase_scale: Any = number(lo=0, help="s_e, the weight of the erased concepts (UCE: 1)")
    preserve_scale: Any = number(lo=0, help="s_p, the weight of the preserved concepts (UCE: 1)")
    templates: Any = setting('optional prompt expansion, e.g. ["{}", "image of {}", "photo of {}"]; []: none')


@dataclass
class PublishedCheckpointConfig(Settings):
    """A method whose checkpoints are only loaded from published files: ``path`` is required."""

    GROUP = "checkpoint"
    LOADS = "published files"  # what checkpoint.path must point to, for the message
    LOADS_FOLDERS = False  # True: checkpoint.path is a folder its loader reads itself
    method: str = setting("the method's registered name (unet_folder, advunlearn; docs/methods.md 8.4)")
    beta: Any = number(lo=0, strict=True, optional=True, help="a label only: the results' beta column")
    path: Any = setting("the published file or folder to load (required; docs/methods.md 8.4)")

    def rules(self, c: Checks) -> None:
        if not self.path:
            c.fail(f"checkpoint={self.method} loads {self.LOADS}: set checkpoint.path")


@dataclass
class SPMCheckpointConfig(Settings):
    """``conf/checkpoint/spm.yaml`` (docs/methods.md 8.3): SPM's adapters, trained or loaded."""

    GROUP = "checkpoint"
    method: str = setting("the method's registered name: spm (docs/methods.md 8.3)")
    beta: Any = number(lo=0, strict=True, optional=True, help="a label only (SPM has no beta); null")
    path: Any = setting("SPM's adapter file (safetensors) loaded instead of training; null: train")
    multiplier: Any = number(
        help="m: each layer is fused as W + m (alpha / r) up . down (SPM: 1; docs/methods.md 8.3)"
    )
    allow_pickle_conversion: bool = setting(
        "pickled adapter files are read only when true (torch.load weights_only), then converted once"
    )
    concept: Any = setting(
        "the concept prompt: a string or {task name: string}; a task's spm_concept overrides it"
    )
    rank: int = number(int, lo=1, help="the adapters' rank (SPM: 1, one-dimensional)")
    alpha: Any = number(lo=0, help="the adapters' alpha; scale alpha / rank (SPM: 1)")
    steps: int = number(int, lo=1, help="training iterations (SPM: 3000)")
    lr: Any = number(lo=0, strict=True, help="AdamW learning rate (SPM: 1e-4)")
    lr_warmup_steps: int = number(
        int, lo=0, help="warm-up steps of the cosine schedule with restarts (SPM: 500)"
    )
    lr_cycles: int = number(int, lo=1, help="cycles of the cosine schedule with restarts (SPM: 3)")
    max_denoising_steps: int = number(int, lo=2, help="steps of the partial sampling's schedule (SPM: 30)")
    start_guidance: Any = number(lo=0, help="CFG scale of the partial sampling (SPM: 3)")
    guidance_scale: Any = number(
        lo=0, help="g of the erasing target neutral - g (positive - neutral) (SPM: 1)"
    )
    la_strength: Any = number(lo=0, help="weight of the latent-anchoring loss; 0: erase only (SPM: 1000)")
    sampling_batch_size: int = number(int, lo=1, help="anchor embeddings drawn per step (SPM: 4)")
    batch: int = number(int, lo=1, help="latents per step (SPM: 1)")
    resolution: Any = number(
        int, lo=8, optional=True, help="training resolution; null: the model's (SPM: 512)"
    )
    seed: int = number(int, seed=True, help="training seed")
    grad_clip: Any = number(
        lo=0, strict=True, optional=True, help="gradient-norm clip; null: none (SPM: none)"
    )
    checkpoint_every: int = number(
        int, lo=1, help="steps between Lightning checkpoints, for resuming an interrupted run"
    )
    precision: str = choice(*PRECISIONS, help="training precision (SPM: float32, 32-true)")

    def rules(self, c: Checks) -> None:
        if self.sampling_batch_size % self.batch:
            n, b = self.sampling_batch_size, self.batch
            c.fail(f"checkpoint.sampling_batch_size ({n}) must be a multiple of checkpoint.batch ({b})")


@dataclass
class UNetFolderCheckpointConfig(PublishedCheckpointConfig):
    """``conf/checkpoint/unet_folder.yaml`` (docs/methods.md 8.4): a diffusers UNet folder."""

    LOADS = "a diffusers UNet folder (SD3: transformer folder)"
    LOADS_FOLDERS = True  # checkpoint.path is a folder: its loader reads (and converts) its files
    allow_pickle_conversion: bool = setting(
        "a folder of diffusion_pytorch_model.bin is read only when true (torch.load weights_only)"
    )


@dataclass
class AdvUnlearnCheckpointConfig(PublishedCheckpointConfig):
    """``conf/checkpoint/advunlearn.yaml`` (docs/methods.md 8.4): AdvUnlearn's text encoder."""

    LOADS = "AdvUnlearn's text encoder"
    LOADS_FOLDERS = True  # checkpoint.path is a folder: its loader reads (and converts) its files
    allow_pickle_conversion: bool = setting(
        "TextEncoder-<name>.pt or pytorch_model.bin are read only when true (torch.load weights_only)"
    )


_MODULES = "unlearn_exp.unlearning."
declare("checkpoint", "original", OriginalCheckpointConfig, _MODULES + "checkpoints", families=("sd1", "sd3"))
declare(
    "checkpoint",
    "duo",
    DUOCheckpointConfig,
    _MODULES + "duo",
    hooks={
        "training_images": _MODULES + "duo:unsafe_pair_images",
        "built_id": _MODULES + "duo:built_checkpoint_id",
        "family_problems": _MODULES + "config:duo_family_problems",  # torch-free: validation calls it
    },
    families=("sd1", "sd3"),  # SD3: conf/checkpoint/duo_sd3.yaml (docs/methods.md 5.8)
)


def duo_family_problems(ck: dict, family: str) -> list[str]:
    """DUO's LoRA targets name the family's denoiser: SD v1's ``attn1.*`` are not SD3's layers."""
    targets = [str(t) for t in ck.get("target_modules") or []]
    if family == "sd3" and any(t.startswith(("attn1.", "attn2.")) for t in targets) and not ck.get("path"):
        return [f"checkpoint.target_modules {targets} are UNet layers: on SD3 use checkpoint=duo_sd3"]
    return []


def esd_label(ck) -> str:
    """ESD's checkpoints are labelled by their variant (esd-u, esd-x): two methods of the methods grid."""
    return str(ck.get("variant") or ck.get("method"))


declare(
    "checkpoint",
    "esd",
    ESDCheckpointConfig,
    _MODULES + "checkpoints",
    hooks={"label": _MODULES + "config:esd_label"},  # torch-free: the rerun reads labels
    families=("sd1", "sd3"),  # SD3: the text stream's attention in cross-attention's place (8.1)
)
declare(
    "checkpoint",
    "uce",
    UCECheckpointConfig,
    _MODULES + "checkpoints",
    families=("sd1", "sd3"),  # SD3: context_embedder and the pooled projection, as UCE's FLUX code (8.2)
)
declare(
    "checkpoint",
    "spm",
    SPMCheckpointConfig,
    _MODULES + "spm",
    families=("sd1", "sd3"),  # SD3: the joint blocks' layers, SDXL's script's pooled vectors (8.3)
)
# SD3: the transformer's folder in the UNet's place; AdvUnlearn's SD v1.4 encoder in CLIP-L's place
declare(
    "checkpoint", "unet_folder", UNetFolderCheckpointConfig, _MODULES + "published", families=("sd1", "sd3")
)
declare(
    "checkpoint", "advunlearn", AdvUnlearnCheckpointConfig, _MODULES + "published", families=("sd1", "sd3")
)
