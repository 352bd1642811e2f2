"""The guidance interface: what a method may do at each sampling step.

A method acts at two points of a step (docs/design.md 4):

1. ``embeddings(i, state)``: the conditioning of every denoiser branch for step ``i``, stacked as one
   ``Conditioning`` of ``n_branches * B`` rows so that all branches go through the denoiser as one
   batch. A method may rewrite the prompt embedding per step (SAFREE) or add branches (SLD's safety
   branch).
2. ``combine(i, preds, state)``: the prediction (noise for SD v1, flow velocity for SD3) from the
   branches' predictions.

``prepare`` encodes everything once per batch; ``unet_hooks`` may install temporary hooks on the
UNet for one step (SAFREE's latent re-attention). ``CFG`` is plain classifier-free guidance
(``guidance=none``): ``eps = eps_u + w (eps_c - eps_u)``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from unlearn_exp.models.components import Components, Conditioning, TokenizedPrompts
from unlearn_exp.registry import GUIDANCE


@dataclass
class Concept:
    """What guidance needs from a concept: explicit words, or learned tokens already added to the
    model's tokenizer and text encoder (``inverted``/``shared``, K >= 1 tokens)."""

    source: str = "explicit"
    tokens: list[str] = field(default_factory=list)
    identity: str = "explicit"
    path: str | None = None  # the learned embedding's file (inverted/shared)

    @property
    def learned(self) -> bool:
        return self.source in ("inverted", "shared")


@dataclass
class GuidanceState:
    """Per-batch tensors and bookkeeping; ``meta`` holds one dict per prompt for the records."""

    branches: list[Conditioning]  # each of B rows, in branch order
    guidance_scale: float
    num_steps: int
    meta: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_branches(self) -> int:
        return len(self.branches)


class Guidance:
    """Base class: classifier-free guidance with a (possibly empty) negative prompt.

    Step windows: a method's step counts (SLD's warm-up, SAFREE's ``up_t`` and re-attention window)
    are counts of the published 50-step sampler. ``step_scale`` (set by ``make_guidance`` from
    ``sampling.scale_step_counts``; 1 keeps the counts as published) carries them to this sampler:
    ``steps(n)`` is ``round(n * step_scale)``, ``in_window(i, start, stop)`` whether step ``i`` lies in
    ``[steps(start), steps(stop)]`` (no ``stop``: from ``start`` on)."""

    name = "none"
    step_scale: float = 1.0

    def steps(self, count: int) -> int:
        """A step count of the 50-step reference sampler, on this sampler."""
        return round(count * self.step_scale)

    def in_window(self, i: int, start: int, stop: int | None = None) -> bool:
        """Whether step ``i`` (0-based) lies in the window from ``start`` to ``stop`` (inclusive)."""
        return self.steps(start) <= i and (stop is None or i <= self.steps(stop))

    def prepare(
        self,
        comps: Components,
        prompts: list[str],
        tokens: TokenizedPrompts,
        negative_prompts: list[str] | None,
        guidance_scale: float,
        num_steps: int,
    ) -> GuidanceState:
        negative = negative_prompts if negative_prompts is not None else [""] * len(prompts)
        cond = comps.condition(tokens)
        uncond = comps.condition_prompts(negative)
        return GuidanceState(branches=[uncond, cond], guidance_scale=guidance_scale, num_steps=num_steps)

    def unet_branches(self, guidance_scale: float) -> int:
        """How many UNet rows each image costs per step (what ``prepare`` will stack); the planner
        counts work with it without building anything."""
        return 2

    def embeddings(self, i: int, state: GuidanceState) -> Conditioning:
        if "stacked" not in state.extra:  # the same every step: stack once
            state.extra["stacked"] = Conditioning.cat(state.branches)
        return state.extra["stacked"]

    def combine(self, i: int, preds: list[torch.Tensor], state: GuidanceState) -> torch.Tensor:
        eps_u, eps_c = preds[0], preds[1]
        return eps_u + state.guidance_scale * (eps_c - eps_u)

    def unet_hooks(self, i: int, state: GuidanceState, unet: torch.nn.Module):
        return contextlib.nullcontext()

    def describe(self) -> dict[str, Any]:
        """The settings that identify this guidance in records and artifact keys."""
        return {"name": self.name}


CFG = Guidance


@GUIDANCE.register("none")
def build_none(guidance_cfg, task_cfg, concept: Concept) -> Guidance:
    """``guidance=none``: plain classifier-free guidance."""
    return CFG()
