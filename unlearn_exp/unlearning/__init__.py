"""Unlearned checkpoints: DUO (docs/methods.md 5), ESD and UCE (8), trained or loaded from published files."""

from unlearn_exp.unlearning.checkpoints import apply_checkpoint
from unlearn_exp.unlearning.pairs import PairSet, build_pair_set, load_pair_set

__all__ = ["apply_checkpoint", "build_pair_set", "load_pair_set", "PairSet"]
