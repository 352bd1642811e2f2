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

import torch

from unlearn_exp.config import typed_preset
from unlearn_exp.guidance.base import Concept, Guidance, GuidanceState
from unlearn_exp.guidance.config import SLDConfig
from unlearn_exp.models.components import Components, TokenizedPrompts
from unlearn_exp.registry import GUIDANCE

# SLD's published configurations (the SLD paper's Table; diffusers' safe pipeline): the values of
# the five settings each preset fixes, overridden per key by a non-null ``guidance.<key>``
PRESETS: dict[str, dict[str, float]] = {
    "weak": {
        "warmup_steps": 15,
        "guidance_scale": 20.0,
        "threshold": 0.0,
        "momentum_scale": 0.0,
        "mom_beta": 0.0,
    },
    "medium": {
        "warmup_steps": 10,
        "guidance_scale": 1000.0,
        "threshold": 0.01,
        "momentum_scale": 0.3,
        "mom_beta": 0.4,
    },
    "strong": {
        "warmup_steps": 7,
        "guidance_scale": 2000.0,
        "threshold": 0.025,
        "momentum_scale": 0.5,
        "mom_beta": 0.7,
    },
    "max": {
        "warmup_steps": 0,
        "guidance_scale": 5000.0,
        "threshold": 1.0,
        "momentum_scale": 0.5,
        "mom_beta": 0.7,
    },
}

DEFAULT_CONCEPT = (
    "an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity, "
    "bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, weapons, "
    "child abuse, brutality, cruelty"
)


def preset_values(settings: SLDConfig) -> dict[str, float]:
    """The five values SLD runs with: the preset's, each replaced by its non-null setting."""
    values = dict(PRESETS[str(settings.preset)])
    values.update({k: getattr(settings, k) for k in values if getattr(settings, k) is not None})
    return values


class SLD(Guidance):
    name = "sld"

    def __init__(self, concept_prompt: str = DEFAULT_CONCEPT, settings: SLDConfig | None = None):
        self.concept_prompt = concept_prompt
        self.settings = settings or typed_preset(SLDConfig, "sld")
        self.values = preset_values(self.settings)

    def enabled(self, guidance_scale: float) -> bool:
        return self.values["guidance_scale"] > 1.0 and guidance_scale > 1.0

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
            state.branches.append(comps.condition(concept).expand(len(prompts)))
        state.extra["nu"] = None
        state.meta = [{"sld_concept_truncated": concept.truncated[0]} for _ in prompts]
        return state

    def combine(self, i: int, preds: list[torch.Tensor], state: GuidanceState) -> torch.Tensor:
        eps_u, eps_p = preds[0], preds[1]
        g = eps_p - eps_u
        if len(preds) == 3:
            p = self.values
            eps_s = preds[2]
            nu = state.extra["nu"]
            if nu is None:
                nu = torch.zeros_like(g)
            d = eps_p - eps_s
            scale = torch.clamp(d.abs() * p["guidance_scale"], max=1.0)  # Eq. 6
            mu = torch.where(d >= p["threshold"], torch.zeros_like(scale), scale)  # Eq. 6
            gamma = mu * (eps_s - eps_u)  # Eq. 4
            gamma = gamma + p["momentum_scale"] * nu  # Eq. 7
            state.extra["nu"] = p["mom_beta"] * nu + (1 - p["mom_beta"]) * gamma  # Eq. 8
            if self.in_window(i, p["warmup_steps"]):  # warm-up gates only the subtraction
                g = g - gamma  # Eq. 3
        return eps_u + state.guidance_scale * g

    def diffusers_arguments(self) -> dict[str, float]:
        """The same settings as diffusers' safe pipeline takes them (``sld_<key>=``)."""
        return {f"sld_{k}": v for k, v in self.values.items()}

    def describe(self) -> dict:
        steps = {"warmup_steps": self.steps(self.values["warmup_steps"])}  # on this sampler
        return {"name": self.name, "concept_prompt": self.concept_prompt, **self.values, **steps}


@GUIDANCE.register("sld")
def build_sld(guidance_cfg, task_cfg, concept: Concept) -> SLD:
    """``guidance=sld``: the safety prompt is the concept text (explicit) or the learned tokens as one
    prompt (sequence embedding)."""
    s = SLDConfig.from_cfg(guidance_cfg)
    text = " ".join(concept.tokens) if concept.learned else (s.concept or task_cfg.sld_concept)
    return SLD(concept_prompt=text, settings=s)
