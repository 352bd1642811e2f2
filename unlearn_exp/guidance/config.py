"""The settings of each guidance method (``conf/guidance/*.yaml``): one typed dataclass per method,
its group's schema and the object its factory receives (``unlearn_exp/settings.py``). No torch."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from omegaconf import MISSING

from unlearn_exp.checks import Checks
from unlearn_exp.settings import Settings, declare, listed, number, probability


class SLDPreset(StrEnum):
    """SLD's published configurations (docs/methods.md 3)."""

    weak = "weak"
    medium = "medium"
    strong = "strong"
    max = "max"


class ProjectionOrder(StrEnum):
    """SAFREE's two projections: ``code`` (I - P_C) P_I, as the official code; ``paper`` P_I (I - P_C)."""

    code = "code"
    paper = "paper"


class LatentReAttention(StrEnum):
    """SAFREE's latent re-attention: ``off`` (the official code's behaviour) or ``paper``."""

    off = "off"
    paper = "paper"


class CFGNegative(StrEnum):
    """The negative prompt of classifier-free guidance when the concept is learned."""

    concept = "concept"
    keywords = "keywords"
    empty = "empty"


class SAFREECompat(StrEnum):
    """``fixed``: SAFREE as specified; ``official``: the official code where it differs
    (docs/departures.md, SAFREE modes)."""

    fixed = "fixed"
    official = "official"


@dataclass
class NoGuidanceConfig(Settings):
    """``conf/guidance/none.yaml``: plain classifier-free guidance."""

    GROUP = "guidance"
    name: str = MISSING


@dataclass
class SLDConfig(Settings):
    """``conf/guidance/sld.yaml``: a preset, each of its values overridable (null keeps the preset's)."""

    GROUP = "guidance"
    name: str = MISSING
    preset: SLDPreset = MISSING
    warmup_steps: Any = number(int, lo=0, optional=True)  # delta
    guidance_scale: Any = number(lo=0, optional=True)  # s_S
    threshold: Any = probability(optional=True)  # lambda (the max preset uses 1.0)
    momentum_scale: Any = number(lo=0, optional=True)  # s_m
    mom_beta: Any = probability(optional=True)  # beta_m
    concept: Any = MISSING  # str | None: the safety concept (null: the task's sld_concept)

    @classmethod
    def needs(cls, config: dict[str, Any], c: Checks) -> None:
        scale = (config.get("sampling") or {}).get("guidance_scale")
        if isinstance(scale, int | float) and not isinstance(scale, bool) and scale <= 1:
            c.fail(
                "SLD needs classifier-free guidance: sampling.guidance_scale must be > 1, "
                f"got {scale:g} (diffusers' safe pipeline applies neither CFG nor SLD at <= 1)"
            )


@dataclass
class SAFREEConfig(Settings):
    """``conf/guidance/safree.yaml`` (docs/methods.md 4)."""

    GROUP = "guidance"
    name: str = MISSING
    alpha: Any = number(lo=0)
    svf: bool = MISSING
    up_t: int = number(int, lo=0)
    svf_k: Any = number(lo=0)
    svf_t0: Any = number(lo=0)
    re_attn_t: list[int] = listed()
    projection_order: ProjectionOrder = MISSING
    lra: LatentReAttention = MISSING
    lra_b1: Any = number(lo=0)
    lra_b2: Any = number(lo=0)
    lra_s1: Any = number(lo=0)
    lra_s2: Any = number(lo=0)
    keywords: Any = MISSING  # list[str] | None: null takes the task's safree_keywords
    cfg_negative: CFGNegative = MISSING
    compat: SAFREECompat = MISSING
    strength: Any = probability()  # s: 1 = SAFREE as published, 0 = plain CFG (the toy's knob, docs/toy.md 7)

    def rules(self, c: Checks) -> None:
        if len(self.re_attn_t) != 2:
            c.fail(f"guidance.re_attn_t must be two step numbers [from, to], got {list(self.re_attn_t)}")


declare("guidance", "none", NoGuidanceConfig, "unlearn_exp.guidance.base")
declare("guidance", "sld", SLDConfig, "unlearn_exp.guidance.sld", root_keys=("sld_guidance_scale",))
declare(
    "guidance",
    "safree",
    SAFREEConfig,
    "unlearn_exp.guidance.safree",
    root_keys=("safree_compat", "safree_strength"),
)
