"""Extending: a new guidance method, judge or unlearning method is one file plus one config
(``_target_``), as the README's worked example shows. The contracts every registered method keeps:
``tests/test_contracts.py``."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import compose
from unlearn_exp.guidance import Concept, make_guidance
from unlearn_exp.guidance.base import Guidance
from unlearn_exp.sampling import sample

NEGPROMPT = '''
"""Negative-prompt guidance: classifier-free guidance with the concept words as negative prompt."""

from unlearn_exp.guidance.base import Guidance


class NegativePrompt(Guidance):
    name = "negprompt"

    def __init__(self, words):
        self.words = words

    def prepare(self, comps, prompts, tokens, negative_prompts, guidance_scale, num_steps):
        return super().prepare(comps, prompts, tokens, [self.words] * len(prompts), guidance_scale, num_steps)

    def describe(self):
        return {"name": self.name, "words": self.words}


def build(guidance_cfg, task_cfg, concept):
    return NegativePrompt(guidance_cfg.get("words") or task_cfg.sld_concept)
'''

CONFIG = """
name: negprompt
_target_: my_methods.negprompt.build
words: nudity, naked
"""


@pytest.fixture
def my_methods(tmp_path, monkeypatch):
    pkg = tmp_path / "my_methods"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "negprompt.py").write_text(textwrap.dedent(NEGPROMPT))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield pkg
    for name in [m for m in sys.modules if m.startswith("my_methods")]:
        del sys.modules[name]


def test_a_new_guidance_method_is_one_file_and_one_config(my_methods, tiny):
    from unlearn_exp.validate import validate

    cfg = compose(["model=tiny"], hydra=False)
    cfg.guidance = OmegaConf.create(
        CONFIG
    )  # what `guidance=negprompt` composes from conf/guidance/negprompt.yaml
    validate(cfg)
    g = make_guidance(cfg.guidance, cfg.task, Concept())
    assert g.describe() == {"name": "negprompt", "words": "nudity, naked"}
    with torch.no_grad():
        mine = sample(tiny, ["a cat"], [1], g, steps=2).images
        same = sample(tiny, ["a cat"], [1], Guidance(), steps=2, negative_prompts=["nudity, naked"]).images
    torch.testing.assert_close(mine, same)


def test_unknown_target_is_one_line():
    from unlearn_exp.errors import UserError

    cfg = compose([], hydra=False)
    cfg.guidance = OmegaConf.create({"name": "x", "_target_": "no_such_package.build"})
    with pytest.raises(UserError, match="_target_ 'no_such_package.build' cannot be imported"):
        make_guidance(cfg.guidance, cfg.task, Concept())


THROWAWAY = '''
"""A throwaway guidance method in one file: its settings, its declaration, its algorithm."""

from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING

from unlearn_exp.guidance.base import Guidance
from unlearn_exp.registry import GUIDANCE
from unlearn_exp.settings import Settings, declare, number


@dataclass
class ThrowawayConfig(Settings):
    """conf/guidance/throwaway.yaml: CFG with the task's SLD concept as negative prompt, scaled."""

    GROUP = "guidance"
    name: str = MISSING
    strength: Any = number(lo=0)


declare("guidance", "throwaway", ThrowawayConfig, __name__)


class Throwaway(Guidance):
    name = "throwaway"

    def __init__(self, settings, words):
        self.settings, self.words = settings, words

    def prepare(self, comps, prompts, tokens, negative_prompts, guidance_scale, num_steps):
        scale = guidance_scale * self.settings.strength
        return super().prepare(comps, prompts, tokens, [self.words] * len(prompts), scale, num_steps)

    def describe(self):
        return {"name": self.name, "strength": self.settings.strength, "words": self.words}


@GUIDANCE.register("throwaway")
def build(guidance_cfg, task_cfg, concept):
    return Throwaway(ThrowawayConfig.from_cfg(guidance_cfg), task_cfg.sld_concept)
'''


@pytest.mark.slow
def test_a_method_declared_in_its_own_file_runs_a_cell(tmp_path, monkeypatch):
    """A new guidance method is its file (settings, declaration, algorithm) and its YAML: its schema,
    its typed validation and its registry entry follow from the declaration, and a cell runs."""
    from tests.helpers import ROOT, toy_overrides
    from unlearn_exp import schema, settings
    from unlearn_exp.cell import run_cell
    from unlearn_exp.config import compose as app_compose
    from unlearn_exp.errors import UserError
    from unlearn_exp.registry import GUIDANCE

    (tmp_path / "throwaway_guidance.py").write_text(THROWAWAY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("UNLEARN_EXP_COMPOSE_CACHE", "off")
    yaml = ROOT / "conf" / "guidance" / "throwaway.yaml"
    yaml.write_text("defaults:\n  - throwaway_schema\n  - _self_\n\nname: throwaway\nstrength: 1.5\n")
    try:
        __import__("throwaway_guidance")
        schema.register()
        assert "throwaway" in settings.declared("guidance") and "throwaway" in GUIDANCE.names()
        with pytest.raises(UserError, match="guidance.strength must be >= 0, got -1"):
            run_cell(app_compose(toy_overrides(tmp_path, "guidance=throwaway", "guidance.strength=-1")))
        with pytest.raises(UserError, match="unknown config key guidance.bogus"):
            app_compose(toy_overrides(tmp_path, "guidance=throwaway", "+guidance.bogus=1"))
        out = run_cell(app_compose(toy_overrides(tmp_path, "guidance=throwaway")))
        assert out["cell"]["guidance"] == "throwaway" and 0 <= out["cell"]["dsr"] <= 1
    finally:
        yaml.unlink()
        settings._DECLARED.pop(("guidance", "throwaway"), None)
        GUIDANCE.factories.pop("throwaway", None)
