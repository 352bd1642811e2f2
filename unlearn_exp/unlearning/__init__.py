"""Unlearned checkpoints: DUO (docs/methods.md 5), ESD, UCE and SPM (8), trained or loaded from
published files; their settings in ``config.py`` (no torch). Names are imported on first use."""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "apply_checkpoint": "checkpoints",
    "build_pair_set": "pairs",
    "load_pair_set": "pairs",
    "PairSet": "pairs",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'unlearn_exp.unlearning' has no attribute '{name}'")
    return getattr(importlib.import_module(f"unlearn_exp.unlearning.{_WHERE[name]}"), name)
