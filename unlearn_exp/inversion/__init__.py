"""Concept inversion (docs/methods.md 6): learn ``C*`` on any model, save it in diffusers'
textual-inversion format; its settings in ``config.py`` (no torch). Names are imported on first use."""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "ConceptInversion": "concept_inversion",
    "InversionDiverged": "concept_inversion",
    "evaluation_loss": "concept_inversion",
    "invert": "concept_inversion",
    "ImageSet": "image_sets",
    "generate_image_set": "image_sets",
    "load_image_folder": "image_sets",
    "read_image_folder": "image_sets",
    "add_placeholder_tokens": "textual_inversion",
    "concept_prompt": "textual_inversion",
    "load_concept_tokens": "textual_inversion",
    "read_textual_inversion": "textual_inversion",
    "save_textual_inversion": "textual_inversion",
    "InversionConfig": "config",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'unlearn_exp.inversion' has no attribute '{name}'")
    return getattr(importlib.import_module(f"unlearn_exp.inversion.{_WHERE[name]}"), name)
