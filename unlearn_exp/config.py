"""Composing the project's Hydra configs outside the app (the demo, the report, the planner, tools).

A composed config is kept on disk as JSON (``$UNLEARN_EXP_COMPOSE_CACHE``, default
``~/.cache/unlearn_exp/compose``; ``off`` disables it) under the hash of its overrides and of what
composition reads: every file under ``conf/``, the structured configs (``schema.py``) and the Hydra
and OmegaConf versions. A second composition of the same overrides reads it back (a few
milliseconds instead of a fifth of a second): a rerun of a recorded grid is then quick. The
interpolations are kept as written (resolved when read, as in a composed config), so environment
variables still take effect; the config read back is a plain ``DictConfig`` in struct mode.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import json
import os
import re
import typing
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import omegaconf
from omegaconf import OmegaConf

from unlearn_exp.atomic import atomic_write_text
from unlearn_exp.errors import UserError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def _cache_dir() -> Path | None:
    env = os.environ.get("UNLEARN_EXP_COMPOSE_CACHE")
    if env == "off":
        return None
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "unlearn_exp" / "compose"


_DIGESTS: dict[tuple, str] = {}


def conf_digest(conf_dir: Path | None = None) -> str:
    """The hash of what composition reads: ``conf/``'s files (names and bytes), the schemas
    (``schema.py``, ``settings.py``, each method's ``config.py``), and the
    Hydra and OmegaConf versions. Recomputed only when a file's size or mtime changes."""
    import hydra

    conf_dir = Path(conf_dir or CONF_DIR)
    package = Path(__file__).parent  # the schemas: schema.py, settings.py and every method's config.py
    schemas = [package / "schema.py", package / "settings.py", *sorted(package.glob("*/config.py"))]
    files = sorted([*(p for p in conf_dir.rglob("*") if p.is_file()), *schemas])
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if stamp not in _DIGESTS:
        h = hashlib.sha256(f"hydra {hydra.__version__} omegaconf {omegaconf.__version__}".encode())
        for p in files:
            name = p.relative_to(conf_dir if p.is_relative_to(conf_dir) else package).as_posix()
            h.update(f"\0{name}\0".encode())
            h.update(p.read_bytes())
        _DIGESTS[stamp] = h.hexdigest()
    return _DIGESTS[stamp]


def group_choices(group: str) -> list[str]:
    """The options of a config group: the YAML files under ``conf/<group>/`` (not the schemas)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_choices(overrides: Sequence[str]) -> None:
    """One ``UserError`` for an override that picks a group option with no YAML (``guidance=sldd``),
    naming the group's real options (Hydra's own message is several lines and lists the schemas).
    Sweeps (``guidance=none,sld``) are checked value by value; sweep functions are left to Hydra."""
    for o in overrides:
        if o.startswith("~") or "=" not in o:
            continue
        key, value = o.lstrip("+").split("=", 1)
        key = key.split("@", 1)[0]
        _check_enum_value(key, value)
        if "." in key or not key or not (CONF_DIR / key).is_dir() or "(" in value or "[" in value:
            continue
        for v in (x.strip() for x in value.split(",")):
            if v and v != "null" and not (CONF_DIR / key / f"{v}.yaml").is_file():
                raise UserError(f"unknown {key} '{v}': choose one of {', '.join(group_choices(key))}")


def override_key(override: str) -> str:
    """The dotted key an override sets: ``+checkpoint.beta=500`` -> ``checkpoint.beta``."""
    return override.lstrip("+~").split("=", 1)[0].split("@", 1)[0]


def pinned_axes(overrides: list[str], params) -> dict[str, str]:
    """The swept keys that ``overrides`` set themselves, with their values: the launcher runs those
    values only (an override on the command line replaces the sweep's values of its key)."""
    out, params = {}, params or {}  # no sweep (a single cell): nothing is pinned
    for o in overrides:
        if "=" in o and override_key(o) in params:
            values = sweep_values(o)
            out[override_key(o)] = ",".join(values) if values else o.split("=", 1)[1]
    return out


def sweep_values(override: str) -> list[str] | None:
    """The values of a sweep override as Hydra's launcher enumerates them (``a=1,2``,
    ``a=range(1,3)``, ``a=choice(x,y)``); None for a plain override, or for a sweep that cannot be
    enumerated (``interval``), which is left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides([override])[0]
        return list(parsed.sweep_string_iterator()) if parsed.is_sweep_override() else None
    except Exception:  # not parseable here, or not enumerable: Hydra itself says what is wrong
        return None


def _first_value(override: str) -> str | None:
    """A sweep override at its first value (None where it cannot be enumerated); others unchanged."""
    key, eq, value = override.partition("=")
    if not eq or not any(c in value for c in ",("):
        return override
    values = sweep_values(override)
    if values is None:
        return None if "(" in value and value.split("(", 1)[0].strip().isidentifier() else override
    return f"{key}={values[0]}"


def precheck(args: Sequence[str]) -> None:
    """What the app checks before Hydra starts (and makes a run or sweep folder): every group option
    exists, and the overrides compose (each sweep at its first value; every value's option is checked
    by ``check_choices``), so an unknown key or value is one ``UserError`` and no empty folder."""
    overrides = [a for a in args if not a.startswith("-")]
    check_choices(overrides)
    if all(a in ("--multirun", "-m") or not a.startswith("-") for a in args):  # not --help, --cfg, ...
        compose([f for f in (_first_value(o) for o in overrides) if f is not None])


def sweep_params(overrides: Sequence[str]):
    """The experiment's ``hydra.sweeper.params`` as composed with ``overrides`` (a comma list in an
    override is a sweep: its first value is composed). Raises where the config has no sweep."""
    firsts = [f for f in (_first_value(o) for o in overrides) if f is not None]
    return compose(firsts, hydra=True).hydra.sweeper.params


def grid(overrides: list[str]) -> list[list[str]]:
    """The sweep of the experiment as lists of overrides, as the launcher runs it (an override of a
    swept key keeps only its values: ``pinned_axes``); cells with guidance=none once."""
    params = sweep_params(overrides)
    pinned = pinned_axes(overrides, params)
    axes = [[f"{k}={v}" for v in str(pinned.get(k, vals)).split(",")] for k, vals in params.items()]
    cells, seen = [], set()
    for combo in itertools.product(*axes):
        combo = list(combo)
        if "guidance=none" in combo:  # the embedding axis is ignored: run it once
            combo = [c if not c.startswith("embedding=") else "embedding=explicit" for c in combo]
        if tuple(combo) not in seen:
            seen.add(tuple(combo))
            cells.append(combo)
    return cells


@lru_cache(maxsize=256)
def _enum_members(group: str, field: str) -> tuple[str, ...]:
    """The members of the ``Enum`` that the group's schemas type ``field`` with (none: not an enum)."""
    from unlearn_exp.schema import SCHEMAS

    members: list[str] = []
    for (g, _), node in SCHEMAS.items():
        hint = typing.get_type_hints(node).get(field) if g == group else None
        for t in (hint, *typing.get_args(hint)):
            if isinstance(t, type) and issubclass(t, enum.Enum):
                members += [m.name for m in t if m.name not in members]
    return tuple(members)


def _check_enum_value(key: str, value: str) -> None:
    """``group.key=value`` where the group's schemas type ``key`` as an ``Enum``: a value that is not
    one of its members is one ``UserError`` (Hydra's own message is several lines)."""
    group, _, field = key.partition(".")
    if not field or "." in field or "(" in value or "[" in value or "$" in value:
        return
    members = list(_enum_members(group, field))
    for v in (x.strip().strip("'\"") for x in value.split(",")):
        if members and v and v != "null" and v not in members:
            raise UserError(f"unknown {key} '{v}': choose one of {members}")


def ordered(overrides: Sequence[str]) -> list[str]:
    """``+debug=...`` after ``+experiment=...``: an experiment read after it would set its sampler
    back (Hydra merges appended configs in order), half a debug run without a word."""
    debug = [o for o in overrides if o.lstrip("+").startswith("debug=")]
    if not debug or not any(o.lstrip("+").startswith("experiment=") for o in overrides):
        return list(overrides)
    return [o for o in overrides if o not in debug] + debug


def compose(overrides: Sequence[str] = (), *, hydra: bool = False):
    """The config ``python -m unlearn_exp <overrides>`` would run; with ``hydra`` the ``hydra`` node
    too (sweep parameters), else overrides of the ``hydra`` node are left out. A config that does not
    compose is one ``UserError``. Without ``hydra``, served from the compose cache when it holds it."""
    overrides = [o for o in ordered(overrides) if hydra or not o.lstrip("+~").startswith("hydra")]
    check_choices(overrides)
    cache = None if hydra else _cache_dir()
    if cache is not None:
        key = hashlib.sha256(json.dumps([conf_digest(), overrides]).encode()).hexdigest()[:32]
        path = cache / f"{key}.json"
        try:
            text = _READ.get(str(path)) or path.read_text()
            cfg = OmegaConf.create(json.loads(text))
            OmegaConf.set_struct(cfg, True)
            _READ[str(path)] = text
            return cfg
        except Exception:  # absent or unreadable: compose it
            pass
    cfg = _hydra_compose(overrides, hydra)
    if cache is not None:
        try:
            cache.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(OmegaConf.to_container(cfg, resolve=False)))
        except OSError:
            pass  # a read-only home is no reason to fail
    return cfg


_READ: dict[str, str] = {}  # cache files read by this process (their names are their content's hash)


def _hydra_compose(overrides: list[str], hydra: bool):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=hydra)
    except Exception as e:
        unknown = re.search(r"Could not override '([^']+)'", str(e))
        if unknown and "To append" in str(e):  # a key no schema has, given without +
            raise UserError(f"unknown config key {unknown.group(1)}: no code reads it (a typo?)") from None
        detail = " ".join(line.strip() for line in str(e).splitlines()[:2] if line.strip())
        raise UserError(f"cannot compose the config {list(overrides)}: {detail}") from e
    finally:
        GlobalHydra.instance().clear()
    from unlearn_exp.schema import refuse_unknown_keys

    refuse_unknown_keys(cfg)
    return cfg


@lru_cache(maxsize=64)
def _preset(group: str, name: str) -> str:
    return json.dumps(OmegaConf.to_container(compose([f"{group}={name}"])[group], resolve=True))


def preset(group: str, name: str, /, **changes: Any) -> dict[str, Any]:
    """The values of ``conf/<group>/<name>.yaml`` as a job composes them (interpolations resolved
    against the default config), with ``changes`` on top: the one way code outside a job (tests,
    bench scripts) gets a group's values, so they live only in the YAML."""
    return {**json.loads(_preset(group, name)), **changes}


def typed_preset(settings_cls: type, name: str, /, **changes: Any):
    """The typed settings object (``unlearn_exp/*/config.py``) of ``conf/<GROUP>/<name>.yaml`` with
    ``changes``: a method built outside a job (tests, bench scripts) gets the YAML's values."""
    return settings_cls.from_cfg(preset(settings_cls.GROUP, name, **changes))
