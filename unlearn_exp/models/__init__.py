"""Model loading per scale: ``load_model(cfg.model)`` returns ``Components`` for sd14, toy or tiny.

Names are imported on first use, so the torch-free modules of this package (``memory``: the
planner's model sizes) load without torch."""

from __future__ import annotations

from unlearn_exp.lazy import lazy_attributes

_WHERE = {
    "DTYPES": "loading",
    "Components": "components",
    "TokenizedPrompts": "components",
    "Conditioning": "components",
    "SD3Components": "sd3",
    "build_tiny": "tiny",
    "build_tiny_sd3": "sd3",
    "load_model": "loading",
    "load_pretrained": "pretrained",
    "load_sd3": "pretrained",
    "save_components": "pretrained",
}
__all__ = sorted(_WHERE)

__getattr__ = lazy_attributes(__name__, _WHERE)
