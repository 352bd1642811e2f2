"""Named factories with one instance per config per process (judges and PP distances use it)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from unlearn_exp.errors import UserError
from unlearn_exp.store import config_hash


class Registry:
    """``register(kind, factory)``; ``build(plain_cfg)`` picks the factory by the config's ``type``
    (default: its ``name``) and caches the instance under the config's hash."""

    def __init__(self, what: str, factories: dict[str, Callable[[dict], Any]] | None = None):
        self.what = what
        self.factories: dict[str, Callable[[dict], Any]] = dict(factories or {})
        self._cache: dict[str, Any] = {}
        self._lock = threading.Lock()

    def register(self, kind: str, factory: Callable[[dict], Any], *, replace: bool = True) -> None:
        if replace or str(kind) not in self.factories:
            self.factories[str(kind)] = factory

    def names(self) -> list[str]:
        return sorted(self.factories)

    def build(self, plain: dict, *, cache: bool = True) -> Any:
        kind = str(plain.get("type") or plain.get("name") or "")
        if kind not in self.factories:
            raise UserError(f"unknown {self.what} '{kind}'; registered: {self.names()}")
        key = config_hash(plain)
        with self._lock:
            if cache and key in self._cache:
                return self._cache[key]
            obj = self.factories[kind](plain)
            if cache:
                self._cache[key] = obj
        return obj
