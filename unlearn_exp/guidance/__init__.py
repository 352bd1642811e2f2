"""Guidance methods (one file each) and the factory that builds one from config and a concept source."""

from __future__ import annotations

from unlearn_exp.errors import UserError
from unlearn_exp.guidance.base import CFG, Concept, Guidance, GuidanceState
from unlearn_exp.guidance.safree import SAFREE, SAFREEParams
from unlearn_exp.guidance.sld import SLD, sld_params
from unlearn_exp.registry import GUIDANCE

__all__ = [
    "CFG",
    "Concept",
    "Guidance",
    "GuidanceState",
    "SAFREE",
    "SAFREEParams",
    "SLD",
    "make_guidance",
    "sld_params",
]


def make_guidance(
    guidance_cfg, task_cfg, concept: Concept | None = None, step_scale: float = 1.0
) -> Guidance:
    """Build the configured method. SLD's safety prompt is the concept text (explicit) or the learned
    tokens as one prompt (sequence embedding); SAFREE's subspace is spanned by the pooled embeddings
    of the keywords (explicit) or of each learned token (rank K).

    ``step_scale`` multiplies the methods' step counts (SLD's warm-up, SAFREE's ``up_t`` and
    ``re_attn_t``), which refer to a 50-step sampler; 1.0 keeps them as published."""
    concept = concept or Concept()
    if concept.learned and not concept.tokens:
        raise UserError(f"embedding '{concept.source}' has no learned tokens")
    return GUIDANCE.get(guidance_cfg)(guidance_cfg, task_cfg, concept, step_scale)
