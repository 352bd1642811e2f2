"""``make_guidance``: the configured guidance method, built for a concept source."""

from __future__ import annotations

from unlearn_exp.errors import UserError
from unlearn_exp.guidance.base import Concept, Guidance
from unlearn_exp.registry import GUIDANCE


def make_guidance(
    guidance_cfg, task_cfg, concept: Concept | None = None, step_scale: float = 1.0
) -> Guidance:
    """Build the configured method. SLD's safety prompt is the concept text (explicit) or the learned
    tokens as one prompt (sequence embedding); SAFREE's subspace is spanned by the pooled embeddings
    of the keywords (explicit) or of each learned token (rank K).

    ``step_scale`` multiplies the methods' step counts (SLD's warm-up, SAFREE's ``up_t`` and
    ``re_attn_t``), which refer to a 50-step sampler; 1.0 keeps them as published. The base class
    applies it (``Guidance.steps``, ``Guidance.in_window``): a factory never sees it."""
    concept = concept or Concept()
    if concept.learned and not concept.tokens:
        raise UserError(f"embedding '{concept.source}' has no learned tokens")
    guidance = GUIDANCE.get(guidance_cfg)(guidance_cfg, task_cfg, concept)
    guidance.step_scale = step_scale
    return guidance
