"""Value checks shared by ``validate.py`` and the typed method configs (``*/config.py``): each check
appends a readable problem, and the caller raises one ``UserError`` naming them all."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

INT64_MAX = 2**63 - 1

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")  # read only behind allow_pickle_conversion


def pickle_refusal(p: Path) -> str:
    """Why a pickled checkpoint is not read as it is, and the two ways the project offers."""
    return (
        f"checkpoint '{p.name}' is a pickle file, which this project does not load as it is: give a "
        ".safetensors file, or set checkpoint.allow_pickle_conversion=true to convert it once into the "
        "cache (tensors only: torch.load(weights_only=True), no code runs)"
    )


PRECISIONS = ("auto", "32-true", "32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true")


class Checks:
    """Collects problems: ``fail``, and the typed checks below, each naming the dotted key."""

    def __init__(self):
        self.problems: list[str] = []

    def fail(self, msg: str) -> None:
        self.problems.append(msg)

    def number(
        self,
        name: str,
        value: Any,
        *,
        lo: float | None = None,
        hi: float | None = None,
        integer: bool = False,
        strict: bool = False,
        optional: bool = False,
    ) -> None:
        """``value`` is a number (an integer with ``integer``) >= ``lo`` (> with ``strict``) and <= ``hi``."""
        if value is None:
            if not optional:
                self.fail(f"{name} is required")
            return
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(f"{name} must be a number, got '{value}'")
            return
        if not math.isfinite(value):
            self.fail(f"{name} must be finite, got {value}")
            return
        if integer and not float(value).is_integer():
            self.fail(f"{name} must be a whole number, got {value}")
            return
        if lo is not None and (value <= lo if strict else value < lo):
            self.fail(f"{name} must be {'>' if strict else '>='} {lo:g}, got {value:g}")
        elif hi is not None and value > hi:
            self.fail(f"{name} must be <= {hi:g}, got {value:g}")

    def seed(self, name: str, value: Any) -> None:
        if value is None:
            return
        self.number(name, value, lo=0, integer=True)
        if isinstance(value, int) and not isinstance(value, bool) and value > INT64_MAX:
            self.fail(f"{name} must fit in int64 (<= {INT64_MAX}), got {value}")

    def choice(self, name: str, value: Any, choices: tuple[str, ...]) -> None:
        if value not in choices:
            self.fail(f"unknown {name} '{value}': choose one of {list(choices)}")

    def flag(self, name: str, value: Any) -> None:
        if not isinstance(value, bool):
            self.fail(f"{name} must be true or false, got '{value}'")
