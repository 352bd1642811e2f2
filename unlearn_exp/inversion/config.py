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
from unlearn_exp.settings import Settings, choice, declare, listed, number, probability, setting


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
    source: ImageSource = setting(
        "where the images come from: generated, duo_pairs or folder (docs/methods.md 6.3)"
    )
    path: Any = setting("the folder of images when source=folder")
    seed: int = number(
        int, seed=True, help="first seed tried (generated); later tries take the next integers"
    )
    max_tries: int = number(int, lo=1, help="samples tried before a generated set stops with an error")
    n_images: Any = number(
        int, lo=1, optional=True, help="images to keep (generated; null: task.inversion_images.n_images)"
    )
    prompts: Any = setting("prompts sampled when source=generated (task.inversion_images.prompts)")
    check: bool = setting("keep only images the filter flags (false: keep every sample)")
    filter: Any = setting(
        "the judge profile that flags images (task.inversion_filter), never the evaluation judge"
    )

    def rules(self, c: Checks) -> None:
        if self.source == ImageSource.folder and not self.path:
            c.fail("inversion.image_set.source=folder needs inversion.image_set.path")
        if self.n_images is not None and self.n_images > self.max_tries:
            c.fail(
                f"inversion.image_set.n_images ({self.n_images}) must be <= max_tries ({self.max_tries}): "
                "each kept image takes at least one try"
            )


@dataclass
class InversionConfig(Settings):
    """``conf/inversion/default.yaml``: AdamW with weight decay 0 (= Adam), lr 5e-3, batch 1, 3000
    steps (docs/methods.md 6.2). ``as_dict``, less its keys at their neutral value, is what a learned
    C*'s key hashes (the image set has its own identity)."""

    GROUP = "inversion"
    num_vectors: int = number(
        int, lo=1, help="K, the learned token vectors (the paper: 1; docs/methods.md 6.2)"
    )
    prompt_tokens: PromptTokens = setting(
        "which of the K tokens the training prompts hold: all, or first as CCE (docs/methods.md 6.3)"
    )
    placeholder: str = setting('the learned token added to the tokenizer (default "<c*>")')
    init_word: str = setting(
        "word whose embedding initialises the token; must be ONE CLIP token (task.init_word)"
    )
    template: Any = setting(
        'a string with one "{}", or a list of them (one drawn per step; docs/methods.md 6.3)'
    )
    lr: Any = number(
        lo=0,
        strict=True,
        help="learning rate, not scaled by the batch (the paper: 5e-3; docs/methods.md 6.2)",
    )
    batch_size: int = number(int, lo=1, help="images per step, no gradient accumulation (the paper: 1)")
    steps: int = number(int, lo=1, help="optimisation steps (the paper: 3000; CCE: 5000)")
    weight_decay: Any = number(lo=0, help="AdamW weight decay; 0 makes it Adam (docs/methods.md 6.2)")
    seed: int = number(int, seed=True, help="training seed")
    betas: Any = listed(help="AdamW's two betas (0.9, 0.999)")
    adam_eps: Any = number(lo=0, strict=True, help="AdamW's eps (1e-8)")
    lr_schedule: str = choice(
        "constant", help="learning-rate schedule: only constant (no warm-up) is implemented"
    )
    flip_p: Any = probability(
        help="RandomHorizontalFlip probability (the augmentation of docs/methods.md 6.2)"
    )
    checkpoint_every: int = number(
        int, lo=1, help="steps between Lightning checkpoints (trainable rows and optimiser only)"
    )
    max_loss: Any = number(
        lo=0,
        strict=True,
        optional=True,
        help="a step loss above this (or NaN/inf) stops the run; null disables",
    )
    precision: str = choice(
        *PRECISIONS, help="auto: 32-true on CPU, 16-mixed on GPU; text encoder fp32 (docs/methods.md 13)"
    )
    eval_draws: int = number(int, lo=0, help='fixed-draw loss of "<c*>" before and after training; 0 skips')
    loss_window: int = number(int, lo=1, help="final and best loss are means over this many steps")
    log_every_n_steps: int = number(
        int, lo=1, help="Lightning's log_every_n_steps: steps between logged losses"
    )
    image_set: ImageSetConfig = dataclasses.field(
        default=MISSING,
        metadata={
            "absent_ok": True,
            "help": "C*'s training images (docs/methods.md 6.3), with an identity of their own",
        },
    )

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


declare("inversion", "default", InversionConfig, families=("sd1", "sd3"))
