"""Concept inversion (docs/methods.md 6): learn ``C*`` on any model, save it in diffusers'
textual-inversion format; its settings in ``config.py`` (no torch). Names are imported on first use."""

from __future__ import annotations

from unlearn_exp.lazy import lazy_attributes

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

__getattr__ = lazy_attributes(__name__, _WHERE)
