"""Concept inversion (docs/methods.md 6): learn ``C*`` on any model, save it in diffusers'
textual-inversion format."""

from unlearn_exp.inversion.concept_inversion import (
    ConceptInversion,
    InversionDiverged,
    InversionSettings,
    evaluation_loss,
    invert,
)
from unlearn_exp.inversion.image_sets import (
    ImageSet,
    generate_image_set,
    load_image_folder,
    read_image_folder,
)
from unlearn_exp.inversion.textual_inversion import (
    add_placeholder_tokens,
    concept_prompt,
    load_concept_tokens,
    read_textual_inversion,
    save_textual_inversion,
)

__all__ = [
    "ConceptInversion",
    "ImageSet",
    "InversionDiverged",
    "InversionSettings",
    "add_placeholder_tokens",
    "concept_prompt",
    "evaluation_loss",
    "generate_image_set",
    "invert",
    "load_concept_tokens",
    "load_image_folder",
    "read_image_folder",
    "read_textual_inversion",
    "save_textual_inversion",
]
