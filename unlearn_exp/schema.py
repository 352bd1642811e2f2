"""Structured configs: the types of each config group's keys, registered in Hydra's ConfigStore.

A group's YAML names its schema first in its defaults list (``- sld_schema``), so composition refuses
an unknown key or a value of the wrong type, and the code reads every key without a default of its
own: the values live once, in the YAML. Fields are ``MISSING`` (``???``): a YAML that leaves one out
fails to compose. Numbers that a config may give as an integer or a float are typed ``Any``, so that a
value keeps the type it was written with (identities hash the config).

Groups with a schema so far: ``guidance`` (none, sld, safree) and ``sampling``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class NoGuidanceConfig:
    name: str = MISSING


@dataclass
class SLDConfig:
    """``conf/guidance/sld.yaml``: a preset, each of its values overridable (null keeps the preset's)."""

    name: str = MISSING
    preset: str = MISSING
    warmup_steps: Any = MISSING  # int | None
    guidance_scale: Any = MISSING  # float | None
    threshold: Any = MISSING
    momentum_scale: Any = MISSING
    mom_beta: Any = MISSING
    concept: Any = MISSING  # str | None: the safety concept (null: the task's)


@dataclass
class SAFREEConfig:
    """``conf/guidance/safree.yaml`` (docs/methods.md 4)."""

    name: str = MISSING
    alpha: Any = MISSING
    svf: bool = MISSING
    up_t: int = MISSING
    svf_k: Any = MISSING
    svf_t0: Any = MISSING
    re_attn_t: list[int] = field(default_factory=lambda: MISSING)  # type: ignore[arg-type]
    projection_order: str = MISSING
    lra: str = MISSING
    lra_b1: Any = MISSING
    lra_b2: Any = MISSING
    lra_s1: Any = MISSING
    lra_s2: Any = MISSING
    keywords: Any = MISSING  # list[str] | None: null takes the task's
    cfg_negative: str = MISSING
    compat: str = MISSING


@dataclass
class SamplingConfig:
    """``conf/sampling/default.yaml``: the sampler, its batching and its GPU options."""

    scheduler: str = MISSING
    steps: int = MISSING
    guidance_scale: Any = MISSING
    resolution: Any = MISSING  # ${model.resolution}
    batch_size: int = MISSING
    precision: str = MISSING
    devices: Any = MISSING  # a count or a list of device ids
    chunk_size: int = MISSING
    progress: bool = MISSING
    scale_step_counts: bool = MISSING
    reference_steps: int = MISSING
    compile: bool = MISSING
    channels_last: bool = MISSING
    tf32: bool = MISSING
    vae_slicing: bool = MISSING
    vae_tiling: bool = MISSING


SCHEMAS = {
    ("guidance", "none_schema"): NoGuidanceConfig,
    ("guidance", "sld_schema"): SLDConfig,
    ("guidance", "safree_schema"): SAFREEConfig,
    ("sampling", "default_schema"): SamplingConfig,
}


def register() -> None:
    """Put every schema into Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    for (group, name), node in SCHEMAS.items():
        cs.store(group=group, name=name, node=node)
