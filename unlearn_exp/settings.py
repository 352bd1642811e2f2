"""The typed home of a method's settings: ``Settings``, the base of every ``*/config.py`` dataclass.

A method's config dataclass is at once its group's Hydra schema (``schema.py`` registers it, so
composition refuses an unknown key, a wrong type and a value outside an ``Enum``) and the object its
factory receives (``SLDConfig.from_cfg(cfg.guidance)``). One field per YAML key, declared once:

- a choice among identifiers is a ``StrEnum`` (composition checks it; the value is still the string);
- a choice among other strings (``"esd-u"``, ``"dpmsolver++"``) is ``choice(...)``;
- a number is ``number(...)``: typed ``Any`` for composition, so the composed config keeps the number
  as it was written (identities hash the config), checked for its range and converted to ``int`` or
  ``float`` in the typed object;
- cross-field rules are the class's ``rules``.

Composition never instantiates the dataclass; ``from_cfg`` does, and ``__post_init__`` raises one
``UserError`` naming every problem (``validate.py`` asks ``problems`` for the same list up front).
Imports no torch: the configs compose and validate in a process that never loads a model.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import MISSING

from unlearn_exp.checks import Checks
from unlearn_exp.errors import UserError
from unlearn_exp.hashing import to_plain


def number(
    kind: type = float,
    *,
    lo: float | None = None,
    hi: float | None = None,
    strict: bool = False,
    optional: bool = False,
    seed: bool = False,
    help: str = "",  # peft's and argparse's name for it
) -> Any:
    """A numeric field: ``kind`` (int or float), at least ``lo`` (above it when ``strict``), at most
    ``hi``, null allowed when ``optional``; ``seed``: an int that fits int64; ``help``: one line."""
    meta = {"number": kind, "lo": lo, "hi": hi, "strict": strict, "optional": optional, "seed": seed}
    return dataclasses.field(default=MISSING, metadata={**meta, "help": help})


def probability(*, optional: bool = False, help: str = "") -> Any:
    """A number in [0, 1] (a threshold on a probability or score, a momentum, a rate): a careless
    ``threshold=6`` meant as 0.6 is refused, not run as "nothing is unsafe"."""
    return number(lo=0, hi=1, optional=optional, help=help)


def choice(*values: str, help: str = "") -> Any:
    """A string field that must be one of ``values`` (strings that are not identifiers)."""
    return dataclasses.field(default=MISSING, metadata={"choices": values, "help": help})


def listed(optional: bool = False, help: str = "") -> Any:
    """A list field (``MISSING`` until composed)."""
    return dataclasses.field(default_factory=lambda: MISSING, metadata={"optional": optional, "help": help})


def setting(help: str) -> Any:
    """Any other field (a flag, an ``Enum``, a string, a nested node), with its one-line ``help``."""
    return dataclasses.field(default=MISSING, metadata={"help": help})


def field_help(cls: type) -> dict[str, str]:
    """``key -> one-line help`` of a settings class's fields (empty where a field has none)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def field_kind(cls: type, name: str) -> str:
    """What a field takes, in words: ``float in [0, 1]``, ``one of code, paper``, ``list``, ``bool``."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    meta, hint = f.metadata, typing.get_type_hints(cls).get(name)
    if meta.get("number") is not None:
        lo, hi = meta["lo"], meta["hi"]
        low = "-inf" if lo is None else lo
        high = "inf" if hi is None else hi
        rng = "" if lo is None and hi is None else f" in {'(' if meta['strict'] else '['}{low}, {high}]"
        return f"{meta['number'].__name__}{rng}{' or null' if meta['optional'] else ''}"
    if meta.get("choices"):
        return "one of " + ", ".join(meta["choices"])
    if (kind := _enum_type(hint)) is not None:
        return "one of " + ", ".join(m.value for m in kind)
    if hint is bool:
        return "bool"
    if f.default_factory is not dataclasses.MISSING:
        return "list"
    return "any" if hint is Any else getattr(hint, "__name__", str(hint))


def _is_missing(value: Any) -> bool:
    return isinstance(value, str) and value == MISSING


class Settings:
    """Base of the typed configs. Subclasses are dataclasses with ``GROUP`` (the config group whose
    keys they describe: messages name ``GROUP.key``) and, where fields depend on each other, a
    ``rules``."""

    GROUP: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if any(_is_missing(getattr(self, f.name)) for f in dataclasses.fields(self)):
            return  # the schema itself, before composition
        problems = self.problems()
        if problems:
            raise UserError("invalid config: " + "; ".join(problems))
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = f.metadata.get("number")
            if kind is not None and value is not None:
                setattr(self, f.name, kind(value))
            elif _enum_type(hints.get(f.name)) and isinstance(value, str):
                setattr(self, f.name, hints[f.name](value))

    def problems(self) -> list[str]:
        """Every problem of these values, each naming its dotted key."""
        c = Checks()
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            name, value, meta = f"{self.GROUP}.{f.name}", getattr(self, f.name), f.metadata
            if meta.get("seed"):
                c.seed(name, value)
            elif meta.get("number") is not None:
                c.number(
                    name,
                    value,
                    lo=meta["lo"],
                    hi=meta["hi"],
                    integer=meta["number"] is int,
                    strict=meta["strict"],
                    optional=meta["optional"],
                )
            elif meta.get("choices"):
                c.choice(name, None if value is None else str(value), meta["choices"])
            elif (kind := _enum_type(hints.get(f.name))) is not None:
                c.choice(name, None if value is None else str(value), tuple(m.value for m in kind))
        if not c.problems:
            self.rules(c)
        return c.problems

    def rules(self, c: Checks) -> None:
        """Rules between fields (a subclass's own); each problem goes to ``c.fail``."""

    @classmethod
    def needs(cls, config: dict[str, Any], c: Checks) -> None:
        """What the method needs of the rest of the job's config (``config``: every group, plain),
        checked by ``validate`` where the method is chosen; each problem goes to ``c.fail``."""

    @classmethod
    def from_cfg(cls, node: Any):
        """The typed object of a composed group node (a ``DictConfig`` or a dict); keys the class does
        not declare are left out, so a schema's extra keys (``_target_``) do not matter here."""
        if isinstance(node, cls):
            return node
        plain = to_plain(node) or {}
        absent_ok = {f.name for f in dataclasses.fields(cls) if f.metadata.get("absent_ok")}
        plain = {**dict.fromkeys(absent_ok), **plain}
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in plain]
        if missing:
            names = ", ".join(f"{cls.GROUP}.{m}" for m in missing)
            raise UserError(f"invalid config: {cls.__name__} needs {names}")
        return cls(**{f.name: plain[f.name] for f in dataclasses.fields(cls)})

    @classmethod
    def problems_of(cls, node: Any) -> list[str]:
        """``problems`` of a composed node, without raising (``validate.py`` collects them all)."""
        plain = to_plain(node)
        obj = object.__new__(cls)  # the values as given, unconverted: __post_init__ would raise
        for f in dataclasses.fields(cls):
            setattr(obj, f.name, plain.get(f.name))
        return obj.problems()


def _enum_type(hint: Any) -> type[enum.Enum] | None:
    """The ``Enum`` class of a field annotation (``Mode`` or ``Mode | None``), else None."""
    for t in (hint, *typing.get_args(hint)):
        if isinstance(t, type) and issubclass(t, enum.Enum):
            return t
    return None


# ----------------------------------------------------------------------------- declarations
@dataclasses.dataclass(frozen=True)
class Declaration:
    """What the framework knows of a method without importing it: its config ``group`` and
    registered ``name`` (``guidance.name``, ``checkpoint.method``, ``judge.type``, ...), its settings
    class (the group's Hydra schema and the object its factory receives), the ``module`` whose import
    registers its factory (imported on first use), and the schema's name in the ConfigStore (the
    ``defaults`` entry of its YAML). The registry's built-in table, the Hydra schemas and validation's
    typed tables are derived from these; nothing else lists a method."""

    group: str
    name: str
    settings: type[Settings]
    module: str | None = None
    schema: str = ""
    hooks: tuple[tuple[str, str], ...] = ()  # (hook name, "module:function"), imported when called
    root_keys: tuple[str, ...] = ()  # root keys its YAML reads (an experiment's setting for the method)
    task_keys: tuple[tuple[str, str], ...] = ()  # (name, task key): the task's words it reads
    families: tuple[str, ...] | None = None  # the model families it runs on (None: any, e.g. a judge)

    def hook(self, name: str):
        """The function behind one of the method's hooks (imported now), or None where it has none."""
        target = dict(self.hooks).get(name)
        if target is None:
            return None
        import importlib

        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)


_DECLARED: dict[tuple[str, str], Declaration] = {}


def declare(
    group: str,
    name: str,
    settings: type[Settings],
    module: str | None = None,
    schema: str | None = None,
    hooks: dict[str, str] | None = None,
    root_keys: tuple[str, ...] = (),
    task_keys: dict[str, str] | None = None,
    families: tuple[str, ...] | None = None,
) -> Declaration:
    """Declare a method (beside its settings, in its package's ``config.py``); returns the declaration.
    ``hooks`` name functions the pipeline calls where a method offers them (a checkpoint method's
    ``training_images``: the images it was trained on, for ``C*``; ``built_id``: the content id of
    its built artifact, found without loading a model; ``label``: how the tables name a checkpoint
    without beta), as ``"module:function"``. ``root_keys``: the root keys its YAML reads with
    ``oc.select`` (set by an experiment for every cell of a sweep, whichever method a cell has:
    ``safree_compat``). ``task_keys``: the task's explicit words a guidance method reads
    (``{"sld": "sld_concept"}``), part of the explicit concept's identity. ``families``: the model
    families (``unlearn_exp/families.py``) a method that touches the model runs on; a cell that pairs it
    with another family is refused before any work (None: any family, as a judge of images)."""
    d = Declaration(
        group,
        name,
        settings,
        module,
        schema or f"{name}_schema",
        tuple((hooks or {}).items()),
        tuple(root_keys),
        tuple((task_keys or {}).items()),
        None if families is None else tuple(families),
    )
    _DECLARED[(group, name)] = d
    return d


def declarations(group: str | None = None) -> list[Declaration]:
    """Every declaration (of ``group``), after importing each package's ``config.py`` once: the
    methods' settings modules are found by their place, so a package that adds one is picked up.
    The settings modules import no torch."""
    _discover()
    return [d for (g, _), d in _DECLARED.items() if group is None or g == group]


def method_hook(group: str, name: Any, hook: str):
    """The function of hook ``hook`` of the method ``name`` of ``group``, or None."""
    _discover()
    d = _DECLARED.get((group, str(name)))
    return d.hook(hook) if d is not None else None


def declared(group: str) -> dict[str, type[Settings]]:
    """``name -> settings class`` of a group's declarations."""
    return {d.name: d.settings for d in declarations(group)}


_DISCOVERED: list[bool] = []


def _discover() -> None:
    if _DISCOVERED:
        return
    import importlib

    package = Path(__file__).parent
    for config in sorted(package.glob("*/config.py")):
        importlib.import_module(f"unlearn_exp.{config.parent.name}.config")
    _DISCOVERED.append(True)


def family_problems(plain: dict, family: str) -> list[str]:
    """One line per chosen method that does not run on the model's ``family`` (its declaration's
    ``families``): the guidance, the checkpoint's method, the inversion where ``C*`` is learned and the
    attack of the attack stage."""
    embedding = (plain.get("embedding") or {}).get("source")
    chosen = [
        ("guidance", (plain.get("guidance") or {}).get("name")),
        ("checkpoint", (plain.get("checkpoint") or {}).get("method")),
    ]
    if plain.get("stage") == "attack":
        chosen.append(("attack", (plain.get("attack") or {}).get("name")))
    if embedding in ("inverted", "shared") and (plain.get("guidance") or {}).get("name") != "none":
        chosen.append(("inversion", "default"))
    _discover()
    problems = []
    for group, name in chosen:
        d = _DECLARED.get((group, str(name)))
        if d is not None and d.families is not None and family not in d.families:
            what = "concept inversion" if group == "inversion" else f"{group} '{name}'"
            problems.append(
                f"{what} does not run on the {family} model family yet (it runs on {', '.join(d.families)})"
            )
        elif d is not None and (check := d.hook("family_problems")) is not None:
            problems.extend(check(plain.get(group) or {}, family))
    return problems
