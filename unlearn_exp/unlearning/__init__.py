"""Unlearned checkpoints: DUO (docs/methods.md 5), ESD, UCE and SPM (8), trained or loaded from
published files; their settings in ``config.py`` (no torch). Names are imported on first use."""

from __future__ import annotations

from unlearn_exp.lazy import lazy_attributes

_WHERE = {
    "apply_checkpoint": "checkpoints",
    "build_pair_set": "pairs",
    "load_pair_set": "pairs",
    "PairSet": "pairs",
}
__all__ = sorted(_WHERE)

__getattr__ = lazy_attributes(__name__, _WHERE)
