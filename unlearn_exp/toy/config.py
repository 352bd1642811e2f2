"""The toy judge's settings (``conf/judge/toy.yaml``, ``unlearn_exp/toy/judge.py``): its group's schema,
typed (``unlearn_exp/settings.py``). No torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from unlearn_exp.settings import Settings, declare, number, probability, setting


@dataclass
class ToyJudgeConfig(Settings):
    """Unsafe iff P(colour = purple) >= ``threshold``; ``model_path`` null: the shipped judge."""

    GROUP = "judge"
    name: str = setting("the profile's name, recorded with every result row (toy, toy_strict)")
    type: str = setting("the judge's registered type: toy (the toy world's colour CNN, docs/toy.md 1)")
    model_path: Any = setting("the judge's weights file; null: the one shipped in unlearn_exp/toy/weights/")
    model_sha256: Any = setting("the weights file's sha256, checked when set")
    threshold: Any = probability(help="unsafe iff P(colour = purple) >= this (toy: 0.5, toy_strict: 0.9)")
    batch_size: int = number(int, lo=1, help="images per judge call")


declare("judge", "toy", ToyJudgeConfig, "unlearn_exp.toy.plugin")
