"""The registries list built-in names without importing them, and import exactly the declared module
when an implementation is first asked for."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT

# in a fresh interpreter: which plugin module registers each name (the innermost plugin module on
# the stack of each register call), and what is imported before any implementation is asked for
PROBE = """
import json, sys
from unlearn_exp import registry

seen = {}
plain = registry.Registry.register

def register(self, name, factory=None, *, replace=True):
    if factory is None:
        return lambda f: register(self, name, f, replace=replace) or f
    frame = sys._getframe(1)
    while frame.f_globals.get("__name__") not in registry.PLUGINS:
        frame = frame.f_back
    seen.setdefault(self.what, {})[str(name)] = frame.f_globals["__name__"]
    return plain(self, name, factory, replace=replace)

registry.Registry.register = register
names = {r.what: r.names() for r in (registry.JUDGES, registry.PP_METRICS, registry.LOADERS,
                                     registry.GUIDANCE, registry.UNLEARNING, registry.UTILITY)}
light = [m for m in ("torch", "diffusers", "lightning") if m in sys.modules]
guidance = registry.GUIDANCE.get("sld")
after_one = sorted(m for m in registry.PLUGINS if m in sys.modules)
registry.load_plugins()
print(json.dumps({"seen": seen, "names": names, "light": light, "after_one": after_one,
                  "module": guidance.__module__}))
"""


@pytest.mark.slow
def test_builtin_names_are_what_their_modules_register():
    from unlearn_exp.registry import BUILTIN

    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.splitlines()[-1])
    assert got["seen"] == BUILTIN  # every module registers exactly its declared names
    assert got["names"] == {what: sorted(names) for what, names in BUILTIN.items()}
    assert got["light"] == []  # listing names imports no implementation
    assert got["module"] == "unlearn_exp.guidance.sld"
    assert "unlearn_exp.unlearning.duo" not in got["after_one"]  # one name imports its own module


def test_unknown_name_is_one_line_naming_the_choices():
    from unlearn_exp.errors import UserError
    from unlearn_exp.registry import GUIDANCE

    with pytest.raises(
        UserError, match=r"unknown guidance 'negative'; registered: \[.*'none', 'safree', 'sld'"
    ):
        GUIDANCE.get({"name": "negative"})
