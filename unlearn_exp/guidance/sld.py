"""Safe Latent Diffusion (SLD), docs/methods.md 3; equation numbers are the SLD paper's.

Branches per step, batched in this order: ``[c_u, c_p, c_S]`` (negative prompt, user prompt,
safety concept). With ``g = eps_p - eps_u`` and ``d = eps_p - eps_S``:

    scale = min(1, s_S |d|)                      (Eq. 6)
    mu    = 0 where d >= lambda, else scale       (Eq. 6)
    gamma = mu (eps_S - eps_u) + s_m nu           (Eq. 4, 7)
    nu    = beta_m nu + (1 - beta_m) gamma        (Eq. 8)
    g     = g - gamma      only from step delta   (Eq. 3, warm-up gates the subtraction only)
    eps   = eps_u + w g

SLD is enabled iff ``s_S > 1`` and ``w > 1`` (diffusers' rule); otherwise it is plain CFG.
The safety concept ``c_S`` is the sequence embedding of the concept prompt: explicit words, or the
learned tokens of an inverted concept (section 3.4).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from unlearn_exp.errors import UserError
from unlearn_exp.guidance.base import Concept, Guidance, GuidanceState
from unlearn_exp.guidance.config import SLDConfig
from unlearn_exp.models.components import Components, TokenizedPrompts
from unlearn_exp.registry import GUIDANCE


@dataclass(frozen=True)
class SLDParams:
    warmup_steps: int  # delta
    guidance_scale: float  # s_S
    threshold: float  # lambda
    momentum_scale: float  # s_m
    mom_beta: float  # beta_m


PRESETS = {
    "weak": SLDParams(15, 20.0, 0.0, 0.0, 0.0),
    "medium": SLDParams(10, 1000.0, 0.01, 0.3, 0.4),
    "strong": SLDParams(7, 2000.0, 0.025, 0.5, 0.7),
    "max": SLDParams(0, 5000.0, 1.0, 0.5, 0.7),
}

DEFAULT_CONCEPT = (
    "an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity, "
    "bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, weapons, "
    "child abuse, brutality, cruelty"
)


def sld_params(preset: str = "medium", **overrides) -> SLDParams:
    if preset not in PRESETS:
        raise UserError(f"unknown SLD preset '{preset}': choose one of {list(PRESETS)}")
    values = asdict(PRESETS[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return SLDParams(**values)


class SLD(Guidance):
    name = "sld"

    def __init__(self, concept_prompt: str = DEFAULT_CONCEPT, params: SLDParams | None = None):
        self.concept_prompt = concept_prompt
        self.params = params or PRESETS["medium"]

    def enabled(self, guidance_scale: float) -> bool:
        return self.params.guidance_scale > 1.0 and guidance_scale > 1.0

    def unet_branches(self, guidance_scale: float) -> int:
        return 3 if self.enabled(guidance_scale) else 2  # + the safety concept's branch

    def prepare(
        self,
        comps: Components,
        prompts: list[str],
        tokens: TokenizedPrompts,
        negative_prompts: list[str] | None,
        guidance_scale: float,
        num_steps: int,
    ) -> GuidanceState:
        state = super().prepare(comps, prompts, tokens, negative_prompts, guidance_scale, num_steps)
        concept = comps.tokenize([self.concept_prompt])
        if self.enabled(guidance_scale):
            c_s, _ = comps.encode_ids(concept.input_ids)
            state.branches.append(c_s.expand(len(prompts), -1, -1))
        state.extra["nu"] = None
        state.meta = [{"sld_concept_truncated": concept.truncated[0]} for _ in prompts]
        return state

    def combine(self, i: int, preds: list[torch.Tensor], state: GuidanceState) -> torch.Tensor:
        eps_u, eps_p = preds[0], preds[1]
        g = eps_p - eps_u
        if len(preds) == 3:
            p = self.params
            eps_s = preds[2]
            nu = state.extra["nu"]
            if nu is None:
                nu = torch.zeros_like(g)
            d = eps_p - eps_s
            scale = torch.clamp(d.abs() * p.guidance_scale, max=1.0)  # Eq. 6
            mu = torch.where(d >= p.threshold, torch.zeros_like(scale), scale)  # Eq. 6
            gamma = mu * (eps_s - eps_u)  # Eq. 4
            gamma = gamma + p.momentum_scale * nu  # Eq. 7
            state.extra["nu"] = p.mom_beta * nu + (1 - p.mom_beta) * gamma  # Eq. 8
            if i >= p.warmup_steps:  # warm-up gates only the subtraction
                g = g - gamma  # Eq. 3
        return eps_u + state.guidance_scale * g

    def describe(self) -> dict:
        return {"name": self.name, "concept_prompt": self.concept_prompt, **asdict(self.params)}


@GUIDANCE.register("sld")
def build_sld(guidance_cfg, task_cfg, concept: Concept, step_scale: float = 1.0) -> SLD:
    """``guidance=sld``: the safety prompt is the concept text (explicit) or the learned tokens as one
    prompt (sequence embedding); the warm-up counts steps of a 50-step sampler (``step_scale``)."""
    s = SLDConfig.from_cfg(guidance_cfg)
    text = " ".join(concept.tokens) if concept.learned else (s.concept or task_cfg.sld_concept)
    params = sld_params(
        s.preset,
        warmup_steps=s.warmup_steps,
        guidance_scale=s.guidance_scale,
        threshold=s.threshold,
        momentum_scale=s.momentum_scale,
        mom_beta=s.mom_beta,
    )
    if step_scale != 1.0:
        params = replace(params, warmup_steps=round(params.warmup_steps * step_scale))
    return SLD(concept_prompt=text, params=params)
