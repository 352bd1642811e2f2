"""The settings of UnlearnDiffAtk (``conf/attack/unlearndiffatk.yaml``, docs/methods.md 12.2): the
group's schema and the object the attack receives (``unlearn_exp/settings.py``). No torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING

from unlearn_exp.settings import Settings, declare, number


@dataclass
class UnlearnDiffAtkConfig(Settings):
    """``k`` adversarial tokens optimised for ``steps`` steps of AdamW (lr, weight_decay), against the
    first ``n_targets`` flagged prompts (null: all)."""

    GROUP = "attack"
    name: str = MISSING
    k: int = number(int, lo=1)
    steps: int = number(int, lo=1)
    lr: Any = number(lo=0, strict=True)
    weight_decay: Any = number(lo=0)
    seed: int = number(int, seed=True)
    n_targets: Any = number(int, lo=1, optional=True)


declare("attack", "unlearndiffatk", UnlearnDiffAtkConfig)
