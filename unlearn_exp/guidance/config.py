"""The settings of each guidance method (``conf/guidance/*.yaml``): one typed dataclass per method,
its group's schema and the object its factory receives (``unlearn_exp/settings.py``). No torch."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from unlearn_exp.checks import Checks
from unlearn_exp.settings import Settings, declare, listed, number, probability, setting


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
    name: str = setting("the method's registered name: none (plain classifier-free guidance)")


@dataclass
class SLDConfig(Settings):
    """``conf/guidance/sld.yaml``: a preset, each of its values overridable (null keeps the preset's)."""

    GROUP = "guidance"
    name: str = setting("the method's registered name: sld")
    preset: SLDPreset = setting("SLD's published configuration whose five values apply (docs/methods.md 3)")
    warmup_steps: Any = number(
        int,
        lo=0,
        optional=True,
        help="delta: steps of a 50-step sampler before the subtraction (null: preset)",
    )
    guidance_scale: Any = number(lo=0, optional=True, help="s_S, Eq. 6: safety guidance scale (null: preset)")
    threshold: Any = probability(optional=True, help="lambda, Eq. 6: where eps_p - eps_S >= it, no guidance")
    momentum_scale: Any = number(
        lo=0, optional=True, help="s_m, Eq. 7: weight of the momentum (null: preset)"
    )
    mom_beta: Any = probability(optional=True, help="beta_m, Eq. 8: momentum decay (null: preset)")
    concept: Any = setting("the safety concept's text with explicit words (null: the task's sld_concept)")

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
    name: str = setting("the method's registered name: safree")
    alpha: Any = number(lo=0, help="token i is a trigger iff d_i >= (1 + alpha) mean of the others (4.2)")
    svf: bool = setting("self-validating filter: the safe embedding only for the first t_sv steps (4.4)")
    up_t: int = number(int, lo=0, help="gamma: the filter's most steps, of a 50-step sampler (4.4)")
    svf_k: Any = number(lo=0, help="k_s: steepness of the filter's sigmoid (4.4; nudity 2.5)")
    svf_t0: Any = number(lo=0, help="t0: midpoint of the filter's sigmoid (4.4; nudity 5.333)")
    re_attn_t: list[int] = listed(
        help="[from, to] steps (of 50) with the safe embedding when svf is off (4.4)"
    )
    projection_order: ProjectionOrder = setting(
        "code: (I - P_C) P_I e, as the official code; paper: P_I (I - P_C) e"
    )
    lra: LatentReAttention = setting("latent re-attention: off (the official runs, a no-op) or paper (4.6)")
    lra_b1: Any = number(lo=0, help="backbone scale of the 1280-channel decoder stage (4.6; 1.0)")
    lra_b2: Any = number(lo=0, help="backbone scale of the 640-channel decoder stage (4.6; 1.0)")
    lra_s1: Any = number(lo=0, help="low-frequency skip scale of the 1280-channel stage (4.6; 0.9)")
    lra_s2: Any = number(lo=0, help="low-frequency skip scale of the 640-channel stage (4.6; 0.2)")
    keywords: Any = setting("the concept's keywords spanning P_C (null: the task's safree_keywords)")
    cfg_negative: CFGNegative = setting(
        "CFG's negative prompt with a learned concept: concept, keywords or empty"
    )
    compat: SAFREECompat = setting("fixed: SAFREE as specified; official: the official code where it differs")
    strength: Any = probability(
        help="s: both edits scaled, 1 = SAFREE as published, 0 = plain CFG (docs/toy.md 7)"
    )

    def rules(self, c: Checks) -> None:
        if len(self.re_attn_t) != 2:
            c.fail(f"guidance.re_attn_t must be two step numbers [from, to], got {list(self.re_attn_t)}")


BOTH = ("sd1", "sd3")  # the model families (unlearn_exp/families.py)
declare("guidance", "none", NoGuidanceConfig, "unlearn_exp.guidance.base", families=BOTH)
declare(
    "guidance",
    "sld",
    SLDConfig,
    "unlearn_exp.guidance.sld",
    root_keys=("sld_guidance_scale",),
    task_keys={"sld": "sld_concept"},
    families=BOTH,
)
declare(
    "guidance",
    "safree",
    SAFREEConfig,
    "unlearn_exp.guidance.safree",
    root_keys=("safree_compat", "safree_strength"),
    task_keys={"keywords": "safree_keywords"},
    families=BOTH,
)
