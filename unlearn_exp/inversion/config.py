"""The settings of concept inversion (``conf/inversion/default.yaml``, docs/methods.md 6): the
optimisation's keys and C*'s image set, typed; the group's schema and the object the optimiser and
the image-set stage receive (``unlearn_exp/settings.py``). No torch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from omegaconf import MISSING

from unlearn_exp.checks import PRECISIONS, Checks
from unlearn_exp.settings import Settings, choice, declare, listed, number, probability


class ImageSource(StrEnum):
    """Where C*'s training images come from (docs/methods.md 6.3)."""

    generated = "generated"  # sampled by the original model, kept where the filter flags the concept
    duo_pairs = "duo_pairs"  # the unsafe half of DUO's pair images
    folder = "folder"  # a folder of your own


class PromptTokens(StrEnum):
    """Which of the K placeholder tokens the training prompts hold (docs/methods.md 6.3)."""

    all = "all"  # every token, "<c*> <c*>_1 ... <c*>_{K-1}", as the concept is prompted afterwards
    first = "first"  # only "<c*>", as CCE and diffusers' example do: the other K-1 rows never train


@dataclass
class ImageSetConfig(Settings):
    """``inversion.image_set``: C*'s training images (docs/methods.md 6.3)."""

    GROUP = "inversion.image_set"
    source: ImageSource = MISSING
    path: Any = MISSING  # the folder when source=folder
    seed: int = number(int, seed=True)
    max_tries: int = number(int, lo=1)
    n_images: Any = number(int, lo=0, optional=True)
    prompts: Any = MISSING
    check: bool = MISSING
    filter: Any = MISSING  # a judge profile or None

    def rules(self, c: Checks) -> None:
        if self.source == ImageSource.folder and not self.path:
            c.fail("inversion.image_set.source=folder needs inversion.image_set.path")


@dataclass
class InversionConfig(Settings):
    """``conf/inversion/default.yaml``: AdamW with weight decay 0 (= Adam), lr 5e-3, batch 1, 3000
    steps (docs/methods.md 6.2). ``as_dict``, less its keys at their neutral value, is what a learned
    C*'s key hashes (the image set has its own identity)."""

    GROUP = "inversion"
    num_vectors: int = number(int, lo=1)
    prompt_tokens: PromptTokens = MISSING
    placeholder: str = MISSING
    init_word: str = MISSING
    template: Any = MISSING  # str | list[str], each with one "{}"
    lr: Any = number(lo=0, strict=True)
    batch_size: int = number(int, lo=1)
    steps: int = number(int, lo=1)
    weight_decay: Any = number(lo=0)
    seed: int = number(int, seed=True)
    betas: Any = listed()
    adam_eps: Any = number(lo=0, strict=True)
    lr_schedule: str = choice("constant")  # only constant (no warm-up) is implemented
    flip_p: Any = probability()
    checkpoint_every: int = number(int, lo=1)
    max_loss: Any = number(lo=0, strict=True, optional=True)
    precision: str = choice(*PRECISIONS)
    eval_draws: int = number(int, lo=0)
    loss_window: int = number(int, lo=1)
    log_every_n_steps: int = number(int, lo=1)
    image_set: ImageSetConfig = dataclasses.field(default=MISSING, metadata={"absent_ok": True})

    @property
    def templates(self) -> list[str]:
        return [self.template] if isinstance(self.template, str) else [str(t) for t in self.template]

    def rules(self, c: Checks) -> None:
        if not self.templates or any(t.count("{}") != 1 for t in self.templates):
            c.fail(f"inversion.template must hold exactly one '{{}}' per template, got {self.template!r}")
        if self.flip_p > 1:
            c.fail(f"inversion.flip_p must be in [0, 1], got {self.flip_p}")
        if not isinstance(self.betas, list | tuple) or len(self.betas) != 2:
            c.fail(f"inversion.betas must be two numbers, got {self.betas!r}")
        if isinstance(self.image_set, dict):
            c.problems += ImageSetConfig.problems_of(self.image_set)

    def as_dict(self) -> dict[str, Any]:
        """The optimisation's settings as plain values (``betas`` a list; no image set)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "image_set"}
        d["betas"] = [float(b) for b in self.betas]
        d["prompt_tokens"] = str(self.prompt_tokens)
        return d


declare("inversion", "default", InversionConfig)
