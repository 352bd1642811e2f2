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


def build(guidance_cfg, task_cfg, concept, step_scale=1.0):
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
