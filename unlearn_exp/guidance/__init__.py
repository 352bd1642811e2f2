"""Guidance methods (one file each) and the factory that builds one from config and a concept source."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from unlearn_exp.errors import UserError
from unlearn_exp.guidance.base import CFG, Guidance, GuidanceState
from unlearn_exp.guidance.safree import SAFREE, SAFREEParams
from unlearn_exp.guidance.sld import SLD, sld_params

__all__ = ["CFG", "Concept", "Guidance", "GuidanceState", "SAFREE", "SLD", "make_guidance"]


@dataclass
class Concept:
    """What guidance needs from a concept: explicit words, or learned tokens already added to the
    model's tokenizer and text encoder (``inverted``/``shared``, K >= 1 tokens)."""

    source: str = "explicit"
    tokens: list[str] = field(default_factory=list)
    identity: str = "explicit"

    @property
    def learned(self) -> bool:
        return self.source in ("inverted", "shared")


def make_guidance(
    guidance_cfg, task_cfg, concept: Concept | None = None, step_scale: float = 1.0
) -> Guidance:
    """Build the configured method. SLD's safety prompt is the concept text (explicit) or the learned
    tokens as one prompt (sequence embedding); SAFREE's subspace is spanned by the pooled embeddings
    of the keywords (explicit) or of each learned token (rank K).

    ``step_scale`` multiplies the methods' step counts (SLD's warm-up, SAFREE's ``up_t`` and
    ``re_attn_t``), which refer to a 50-step sampler; 1.0 keeps them as published."""
    concept = concept or Concept()
    name = guidance_cfg.name
    if concept.learned and not concept.tokens:
        raise UserError(f"embedding '{concept.source}' has no learned tokens")
    if name == "none":
        return CFG()
    if name == "sld":
        text = (
            " ".join(concept.tokens)
            if concept.learned
            else (guidance_cfg.get("concept") or task_cfg.sld_concept)
        )
        params = sld_params(
            guidance_cfg.get("preset", "medium"),
            warmup_steps=guidance_cfg.get("warmup_steps"),
            guidance_scale=guidance_cfg.get("guidance_scale"),
            threshold=guidance_cfg.get("threshold"),
            momentum_scale=guidance_cfg.get("momentum_scale"),
            mom_beta=guidance_cfg.get("mom_beta"),
        )
        if step_scale != 1.0:
            params = replace(params, warmup_steps=round(params.warmup_steps * step_scale))
        return SLD(concept_prompt=text, params=params)
    if name == "safree":
        keywords = list(guidance_cfg.get("keywords") or task_cfg.safree_keywords or [])
        if not keywords:
            raise UserError("SAFREE needs keywords: set guidance.keywords or the task's safree_keywords")
        if concept.learned:
            prompts = list(concept.tokens)
            mode = guidance_cfg.get("cfg_negative", "concept")
            negatives = {"concept": " ".join(concept.tokens), "keywords": ", ".join(keywords), "empty": ""}
            if mode not in negatives:
                raise UserError(f"guidance.cfg_negative must be one of {list(negatives)}, got '{mode}'")
            negative = negatives[mode]
        else:
            prompts, negative = keywords, ", ".join(keywords)
        re_attn = tuple(guidance_cfg.get("re_attn_t", (-1, 1001)))
        params = SAFREEParams(
            alpha=float(guidance_cfg.get("alpha", 0.01)),
            svf=bool(guidance_cfg.get("svf", True)),
            up_t=round(int(guidance_cfg.get("up_t", 10)) * step_scale),
            svf_k=float(guidance_cfg.get("svf_k", 2.5)),
            svf_t0=float(guidance_cfg.get("svf_t0", 5.333)),
            re_attn_t=(round(int(re_attn[0]) * step_scale), round(int(re_attn[1]) * step_scale)),
            projection_order=str(guidance_cfg.get("projection_order", "code")),
            lra=str(guidance_cfg.get("lra", "off")),
            lra_b1=float(guidance_cfg.get("lra_b1", 1.0)),
            lra_b2=float(guidance_cfg.get("lra_b2", 1.0)),
            lra_s1=float(guidance_cfg.get("lra_s1", 0.9)),
            lra_s2=float(guidance_cfg.get("lra_s2", 0.2)),
            compat=str(guidance_cfg.get("compat", "fixed")),
        )
        return SAFREE(concept_prompts=prompts, negative_prompt=negative, params=params)
    raise UserError(f"unknown guidance '{name}': choose none, sld or safree")
