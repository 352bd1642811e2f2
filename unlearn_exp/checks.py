"""Value checks shared by ``validate.py`` and the typed method configs (``*/config.py``): each check
appends a readable problem, and the caller raises one ``UserError`` naming them all."""

from __future__ import annotations

import math
from typing import Any

INT64_MAX = 2**63 - 1


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
