"""The settings of each unlearning method (``conf/checkpoint/*.yaml``): one typed dataclass per method,
its group's schema and the object its loader receives (``unlearn_exp/settings.py``). No torch.

The trained checkpoints' identities hash the composed ``checkpoint`` node as written (a ``1000``
stays an int there); the typed objects carry the converted values the code computes with."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from omegaconf import MISSING

from unlearn_exp.checks import PRECISIONS, Checks
from unlearn_exp.settings import Settings, choice, declare, listed, number

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
    method: str = MISSING
    beta: Any = number(lo=0, strict=True, optional=True)  # a label only
    path: Any = MISSING


@dataclass
class PairSamplingConfig:
    """How DUO's pair images are sampled (null keeps the cell's sampler setting)."""

    scheduler: Any = MISSING  # str | None
    steps: Any = MISSING
    guidance_scale: Any = MISSING


@dataclass
class DUOCheckpointConfig(Settings):
    """``conf/checkpoint/duo.yaml`` (docs/methods.md 5)."""

    GROUP = "checkpoint"
    method: str = MISSING
    beta: Any = number(lo=0, strict=True)
    path: Any = MISSING  # str | list[str] | None
    adapter_weights: Any = MISSING  # list[float] | None
    filter: Any = MISSING  # a judge profile (the task's DUO filter) or None
    allow_pickle_conversion: bool = MISSING
    lr_base: Any = number(lo=0, strict=True)
    lambda_base: Any = number(lo=0)
    lr_override: Any = number(lo=0, strict=True, optional=True)
    lambda_override: Any = number(lo=0, optional=True)
    beta_scale: Any = number(lo=0, strict=True)
    beta_map: Any = MISSING  # list of [paper beta, beta] pairs | None (the toy's departure, docs/toy.md)
    steps: Any = number(int, lo=1, optional=True)  # None takes each adapter's steps from the recipe
    batch: int = number(int, lo=1)
    rank: int = number(int, lo=1)
    alpha: Any = number(lo=0, strict=True)
    init_lora_weights: Any = MISSING  # peft's init_lora_weights: a name or a bool
    target_modules: list[str] = listed()
    condition: DUOCondition = MISSING
    t_min: int = number(int, lo=1)
    t_max: int = number(int, lo=1)
    seed: int = number(int, seed=True)
    weight_decay: Any = number(lo=0)
    grad_clip: Any = number(lo=0, strict=True, optional=True)  # None: no clipping
    checkpoint_every: int = number(int, lo=1)
    precision: str = choice(*PRECISIONS)
    max_tries: int = number(int, lo=1)
    pair_batch: int = number(int, lo=1)
    pair_sampling: PairSamplingConfig = MISSING
    recipes: Any = MISSING  # task name -> {adapters: [...]}

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
    method: str = MISSING
    beta: Any = number(lo=0, strict=True, optional=True)
    path: Any = MISSING
    allow_pickle_conversion: bool = MISSING
    variant: str = choice(*ESD_VARIANTS)
    concept: Any = MISSING  # str | {task name: str}
    steps: int = number(int, lo=1)
    lr: Any = number(lo=0, strict=True)
    eta: Any = number(lo=0)
    start_guidance: Any = number(lo=0)
    ddim_steps: int = number(int, lo=1)
    batch: int = number(int, lo=1)
    sample_with: ESDSampler = MISSING
    seed: int = number(int, seed=True)
    grad_clip: Any = number(lo=0, strict=True, optional=True)
    checkpoint_every: int = number(int, lo=1)
    precision: str = choice(*PRECISIONS)


@dataclass
class UCECheckpointConfig(Settings):
    """``conf/checkpoint/uce.yaml`` (docs/methods.md 8.2)."""

    GROUP = "checkpoint"
    method: str = MISSING
    beta: Any = number(lo=0, strict=True, optional=True)
    path: Any = MISSING
    allow_pickle_conversion: bool = MISSING
    erase: Any = MISSING  # list[str] | {task name: list[str]}
    guide: Any = MISSING  # str | list[str]
    preserve: Any = MISSING
    lamb: Any = number(lo=0)
    erase_scale: Any = number(lo=0)
    preserve_scale: Any = number(lo=0)
    templates: Any = MISSING


@dataclass
class PublishedCheckpointConfig(Settings):
    """A method whose checkpoints are only loaded from published files: ``path`` is required."""

    GROUP = "checkpoint"
    LOADS = "published files"  # what checkpoint.path must point to, for the message
    LOADS_FOLDERS = False  # True: checkpoint.path is a folder its loader reads itself
    method: str = MISSING
    beta: Any = number(lo=0, strict=True, optional=True)  # a label only
    path: Any = MISSING

    def rules(self, c: Checks) -> None:
        if not self.path:
            c.fail(f"checkpoint={self.method} loads {self.LOADS}: set checkpoint.path")


@dataclass
class SPMCheckpointConfig(PublishedCheckpointConfig):
    """``conf/checkpoint/spm.yaml`` (docs/methods.md 8.3): SPM's published adapters, loaded only."""

    LOADS = "SPM's published adapters"
    multiplier: Any = number()
    allow_pickle_conversion: bool = MISSING


@dataclass
class UNetFolderCheckpointConfig(PublishedCheckpointConfig):
    """``conf/checkpoint/unet_folder.yaml`` (docs/methods.md 8.4): a diffusers UNet folder."""

    LOADS = "a diffusers UNet folder"
    LOADS_FOLDERS = True  # checkpoint.path is a folder: its loader reads (and converts) its files
    allow_pickle_conversion: bool = MISSING


@dataclass
class AdvUnlearnCheckpointConfig(PublishedCheckpointConfig):
    """``conf/checkpoint/advunlearn.yaml`` (docs/methods.md 8.4): AdvUnlearn's text encoder."""

    LOADS = "AdvUnlearn's text encoder"
    LOADS_FOLDERS = True  # checkpoint.path is a folder: its loader reads (and converts) its files
    allow_pickle_conversion: bool = MISSING


_MODULES = "unlearn_exp.unlearning."
declare("checkpoint", "original", OriginalCheckpointConfig, _MODULES + "checkpoints")
declare(
    "checkpoint",
    "duo",
    DUOCheckpointConfig,
    _MODULES + "duo",
    hooks={
        "training_images": _MODULES + "duo:unsafe_pair_images",
        "built_id": _MODULES + "duo:built_checkpoint_id",
    },
)
declare("checkpoint", "esd", ESDCheckpointConfig, _MODULES + "checkpoints")
declare("checkpoint", "uce", UCECheckpointConfig, _MODULES + "checkpoints")
declare("checkpoint", "spm", SPMCheckpointConfig, _MODULES + "spm")
declare("checkpoint", "unet_folder", UNetFolderCheckpointConfig, _MODULES + "published")
declare("checkpoint", "advunlearn", AdvUnlearnCheckpointConfig, _MODULES + "published")
