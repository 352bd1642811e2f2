"""The direction probe of the precondition measurement (``unlearn_exp/precondition.py``, finding (a)):
classifier-free guidance that also measures how two guidance directions agree."""

from __future__ import annotations

import torch

from unlearn_exp.guidance.base import Guidance, GuidanceState


class DirectionProbe(Guidance):
    """Classifier-free guidance (the unguided cell's trajectory) that also predicts the noise for the
    concept words and for ``C*`` and records, per step and image, the cosine between
    ``eps(words) - eps(uncond)`` and ``eps(C*) - eps(uncond)``."""

    name = "probe"

    def __init__(self, words: str, concept_tokens: list[str]):
        self.words = words
        self.concept = " ".join(concept_tokens)
        self.cosines: list[torch.Tensor] = []  # one (B,) tensor per step and batch

    def unet_branches(self, guidance_scale: float) -> int:
        return 4  # uncond, prompt, words, C*

    def prepare(self, comps, prompts, tokens, negative_prompts, guidance_scale, num_steps) -> GuidanceState:
        state = super().prepare(comps, prompts, tokens, negative_prompts, guidance_scale, num_steps)
        words = comps.condition_prompts([self.words] * len(prompts))
        concept = comps.condition_prompts([self.concept] * len(prompts))
        state.branches += [words, concept]
        return state

    def combine(self, i: int, preds: list[torch.Tensor], state: GuidanceState) -> torch.Tensor:
        eps_u, eps_c, eps_w, eps_s = preds
        d_words = (eps_w - eps_u).flatten(1).float()
        d_concept = (eps_s - eps_u).flatten(1).float()
        self.cosines.append(torch.nn.functional.cosine_similarity(d_words, d_concept, dim=1).cpu())
        return eps_u + state.guidance_scale * (eps_c - eps_u)
