"""``python -m unlearn_exp.describe [GROUP [CHOICE]]``: what a method's settings mean.

Without arguments: every declared method by config group. With a group (``guidance``,
``checkpoint``, ``judge``, ...): its choices (``conf/<group>/*.yaml``) and the method each selects.
With a group and a choice (``guidance sld``, ``checkpoint duo_toy``): each key of that YAML as a job
composes it, what it takes and its one-line help (the settings class's ``help``). Imports no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from unlearn_exp.config import group_choices, preset
from unlearn_exp.errors import UserError, exit_status
from unlearn_exp.settings import declarations, field_help, field_kind

SELECTING_KEYS = ("method", "type", "name")  # what a group's YAML names its method by


def _declaration(group: str, values: dict[str, Any]):
    """The declaration a composed group node selects (by ``method``, ``type`` or ``name``), or None."""
    for d in declarations(group):
        if any(values.get(k) == d.name for k in SELECTING_KEYS):
            return d
    return None


def _show(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= 28 else text[:25] + "..."


def describe_choice(group: str, choice: str) -> str:
    """The table of one YAML's keys: value as composed, what the key takes, and its help."""
    if choice not in group_choices(group):
        raise UserError(f"no choice '{choice}' in group '{group}': choose one of {group_choices(group)}")
    values = preset(group, choice)
    d = _declaration(group, values)
    if d is None:
        keys = ", ".join(values)
        return f"{group}/{choice}: no declared method selects it (keys: {keys})\n"
    helps = field_help(d.settings)
    doc = (d.settings.__doc__ or "").strip().splitlines()[0]
    lines = [f"{group}={choice}: {d.name} ({d.settings.__name__}, {d.module or 'no module'})", f"  {doc}", ""]
    rows = [("key", "value", "takes", "help")]
    for f in dataclasses.fields(d.settings):
        rows.append((f.name, _show(values.get(f.name)), field_kind(d.settings, f.name), helps[f.name]))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    if d.root_keys:
        lines += ["", f"  root keys an experiment may set for it: {', '.join(d.root_keys)}"]
    return "\n".join(lines) + "\n"


def describe_group(group: str) -> str:
    """A group's choices and the declared method each selects."""
    choices = group_choices(group)
    if not choices:
        raise UserError(f"no config group '{group}'")
    lines = [f"{group}: {len(choices)} choices (python -m unlearn_exp.describe {group} CHOICE)"]
    for c in choices:
        d = _declaration(group, preset(group, c))
        lines.append(f"  {c:<28} {d.name if d else '-'}")
    return "\n".join(lines) + "\n"


def describe_all() -> str:
    """Every declared method, by group."""
    lines, groups = [], {}
    for d in declarations():
        groups.setdefault(d.group, []).append(d.name)
    for group, names in sorted(groups.items()):
        lines.append(f"{group:<12} {', '.join(names)}")
    lines.append("\npython -m unlearn_exp.describe GROUP [CHOICE]: a group's choices, a choice's keys")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m unlearn_exp.describe", description=__doc__.splitlines()[0])
    ap.add_argument("group", nargs="?", help="a config group: guidance, checkpoint, judge, inversion, attack")
    ap.add_argument("choice", nargs="?", help="one of the group's YAML files (without .yaml)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        if args.group is None:
            text = describe_all()
        elif args.choice is None:
            text = describe_group(args.group)
        else:
            text = describe_choice(args.group, args.choice)
        print(text, end="")
        return 0

    return exit_status(body)


if __name__ == "__main__":
    sys.exit(main())
