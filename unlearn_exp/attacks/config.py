"""The settings of UnlearnDiffAtk (``conf/attack/unlearndiffatk.yaml``, docs/methods.md 12.2): the
group's schema and the object the attack receives (``unlearn_exp/settings.py``). No torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from unlearn_exp.settings import Settings, declare, number, setting


@dataclass
class UnlearnDiffAtkConfig(Settings):
    """``k`` adversarial tokens optimised for ``steps`` steps of AdamW (lr, weight_decay), against the
    first ``n_targets`` flagged prompts (null: all)."""

    GROUP = "attack"
    name: str = setting("the attack's registered name: unlearndiffatk (docs/methods.md 12.2)")
    k: int = number(int, lo=1, help="adversarial tokens prepended to the prompt (UnlearnDiffAtk: 5)")
    steps: int = number(int, lo=1, help="optimisation steps per target (UnlearnDiffAtk: 40)")
    lr: Any = number(lo=0, strict=True, help="AdamW lr on the continuous token rows (UnlearnDiffAtk: 0.01)")
    weight_decay: Any = number(lo=0, help="AdamW weight decay (UnlearnDiffAtk: 0.1)")
    seed: int = number(int, seed=True, help="seed of the (t, eps) draws, one per step from (seed, step)")
    n_targets: Any = number(
        int,
        lo=1,
        optional=True,
        help="the first n benchmark prompts whose original image is flagged; null: all",
    )


declare("attack", "unlearndiffatk", UnlearnDiffAtkConfig, families=("sd1", "sd3"))
