"""The toy judge's settings (``conf/judge/toy.yaml``, ``unlearn_exp/toy/judge.py``): its group's schema,
typed (``unlearn_exp/settings.py``). No torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING

from unlearn_exp.settings import Settings, declare, number, probability


@dataclass
class ToyJudgeConfig(Settings):
    """Unsafe iff P(colour = purple) >= ``threshold``; ``model_path`` null: the shipped judge."""

    GROUP = "judge"
    name: str = MISSING
    type: str = MISSING
    model_path: Any = MISSING
    model_sha256: Any = MISSING
    threshold: Any = probability()
    batch_size: int = number(int, lo=1)


declare("judge", "toy", ToyJudgeConfig, "unlearn_exp.toy.plugin")
