"""Guidance methods (one file each), their settings (``config.py``, no torch) and the factory that
builds one from config and a concept source (``make_guidance``). Names are imported on first use,
so ``unlearn_exp.guidance.config`` composes and validates without loading torch."""

from __future__ import annotations

from unlearn_exp.lazy import lazy_attributes

_WHERE = {
    "CFG": "base",
    "Concept": "base",
    "Guidance": "base",
    "GuidanceState": "base",
    "SAFREE": "safree",
    "SLD": "sld",
    "make_guidance": "factory",
}
__all__ = sorted(_WHERE)

__getattr__ = lazy_attributes(__name__, _WHERE)
