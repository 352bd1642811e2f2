"""One plugin boundary: named registries of implementations, and ``_target_`` for new ones.

Every pluggable part of the pipeline is chosen from its config one way: a registered name (the
config's ``type``, ``name``, ``loader`` or ``method`` key), or ``_target_: package.module.attr``
naming a factory directly (a new method in one file plus one config, no edit anywhere else). The
built-in implementations and the toy world register themselves when their modules are imported.
Each registry knows its built-in names and the module that registers each (``BUILTIN``), so it lists
and checks names without importing anything (validation stays fast), and imports a module only
when its implementation is first asked for; ``load_plugins()`` imports them all.

==============  =========================  ==================================================
registry        selected by                factory signature
==============  =========================  ==================================================
``JUDGES``      ``judge.type`` / ``name``  ``factory(cfg: dict) -> Judge``
``PP_METRICS``  ``pp.metric.type``/``name````factory(cfg: dict) -> Distance``
``LOADERS``     ``benchmark.loader``       ``factory(cfg, data_dir) -> DataFrame``
``GUIDANCE``    ``guidance.name``          ``factory(guidance_cfg, task_cfg, concept)``
``UNLEARNING``  ``checkpoint.method``      ``factory(comps, cfg: dict, store, *, task_cfg, judge,
                                           sample_kwargs, logger)``
``UTILITY``     ``utility.type`` / ``name````factory(cfg: dict) -> Utility`` (``report --utility``)
==============  =========================  ==================================================
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Mapping
from typing import Any

from unlearn_exp.errors import UserError
from unlearn_exp.hashing import config_hash
from unlearn_exp.settings import declarations

# registry -> built-in name -> the module whose import registers it (the toy world's included);
# tests/test_registry.py checks that each module registers exactly these names
BUILTIN: dict[str, dict[str, str]] = {
    "PP metric": {
        "lpips": "unlearn_exp.evaluation.pp",
        "lpips_alex": "unlearn_exp.evaluation.pp",
        "toy_features": "unlearn_exp.toy.plugin",
    },
    "benchmark loader": {
        **dict.fromkeys(("i2p", "csv", "prompts_file"), "unlearn_exp.data.loaders"),
        "ring_a_bell": "unlearn_exp.attacks.ring_a_bell",
        "toy": "unlearn_exp.toy.plugin",
    },
    "utility metric": {
        **dict.fromkeys(("clip_score", "fid", "kid"), "unlearn_exp.evaluation.utility"),
        **dict.fromkeys(("toy_clip_score", "toy_fid", "toy_kid"), "unlearn_exp.toy.plugin"),
    },
}
# the registries whose built-ins are declared beside their settings (settings.declare)
DECLARED_GROUPS = {"judge type": "judge", "guidance": "guidance", "unlearning method": "checkpoint"}
for _what, _group in DECLARED_GROUPS.items():
    BUILTIN[_what] = {d.name: d.module for d in declarations(_group) if d.module}

PLUGINS = tuple(dict.fromkeys(m for names in BUILTIN.values() for m in names.values()))
_loaded = False
_load_lock = threading.Lock()


def load_plugins() -> None:
    """Import every module in ``PLUGINS`` once (each registers its implementations)."""
    global _loaded
    if _loaded:
        return
    with _load_lock:
        if not _loaded:
            for name in PLUGINS:
                importlib.import_module(name)
            _loaded = True


def import_target(target: str) -> Callable:
    """``package.module.attr`` (or ``package.module:attr``) -> the object, one-line error otherwise."""
    module, sep, attr = target.partition(":")
    if not sep:
        module, _, attr = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise UserError(f"_target_ '{target}' cannot be imported: {exc}") from None


class Registry:
    """Named factories. ``select`` lists the config keys that name one (first present wins)."""

    def __init__(self, what: str, select: tuple[str, ...]):
        self.what = what
        self.select = select
        self.builtin = BUILTIN.get(what, {})  # name -> module registering it, imported on first use
        self.factories: dict[str, Callable[..., Any]] = {}
        self._cache: dict[str, Any] = {}
        self._lock = threading.Lock()

    def register(self, name: str, factory: Callable[..., Any] | None = None, *, replace: bool = True):
        """Register ``factory`` under ``name``; without a factory, a decorator."""
        if factory is None:
            return lambda f: self.register(name, f, replace=replace) or f
        if replace or str(name) not in self.factories:
            self.factories[str(name)] = factory
        return factory

    def names(self) -> list[str]:
        """Every registered name and every built-in one (nothing is imported)."""
        return sorted({*self.factories, *self.builtin})

    def name_of(self, cfg: Mapping[str, Any] | str) -> str:
        if isinstance(cfg, str):
            return cfg
        return str(next((cfg.get(k) for k in self.select if cfg.get(k)), ""))

    def get(self, cfg: Mapping[str, Any] | str) -> Callable[..., Any]:
        """The factory a config (or a name) selects: its ``_target_``, else the registered name."""
        if not isinstance(cfg, str) and cfg.get("_target_"):
            return import_target(str(cfg["_target_"]))
        name = self.name_of(cfg)
        if name not in self.factories and name in self.builtin:
            importlib.import_module(self.builtin[name])  # registers it
        if name not in self.factories:
            raise UserError(f"unknown {self.what} '{name}'; registered: {self.names()}")
        return self.factories[name]

    def build(self, plain: dict, *, cache: bool = True, **kwargs) -> Any:
        """``get(plain)(plain, **kwargs)``; with ``cache`` one instance per config per process."""
        factory = self.get(plain)
        cfg = {k: v for k, v in plain.items() if k != "_target_"}
        if not cache:
            return factory(cfg, **kwargs)
        key = config_hash(plain)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = factory(cfg, **kwargs)
            return self._cache[key]


JUDGES = Registry("judge type", ("type", "name"))
PP_METRICS = Registry("PP metric", ("type", "name"))
LOADERS = Registry("benchmark loader", ("loader",))
GUIDANCE = Registry("guidance", ("name",))
UNLEARNING = Registry("unlearning method", ("method",))
UTILITY = Registry("utility metric", ("type", "name"))
