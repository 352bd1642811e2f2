"""Guidance methods (one file each), their settings (``config.py``, no torch) and the factory that
builds one from config and a concept source (``make_guidance``). Names are imported on first use,
so ``unlearn_exp.guidance.config`` composes and validates without loading torch."""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "CFG": "base",
    "Concept": "base",
    "Guidance": "base",
    "GuidanceState": "base",
    "SAFREE": "safree",
    "SAFREEParams": "safree",
    "SLD": "sld",
    "sld_params": "sld",
    "make_guidance": "factory",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'unlearn_exp.guidance' has no attribute '{name}'")
    return getattr(importlib.import_module(f"unlearn_exp.guidance.{_WHERE[name]}"), name)
