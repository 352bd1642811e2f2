"""Package attributes imported on first use (PEP 562), so that a package's torch-free modules (its
``config.py``) load without importing the rest: ``__getattr__ = lazy_attributes(__name__, WHERE)``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_attributes(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``package.<where[name]>`` when ``name`` is first asked for."""

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module '{package}' has no attribute '{name}'")
        return getattr(importlib.import_module(f"{package}.{where[name]}"), name)

    return __getattr__
