"""The toy's guidance calibration (docs/toy.md 7): the rule written before any rung was run, and
SAFREE's strength knob it turns."""

import pandas as pd
import pytest
import torch

from unlearn_exp import config
from unlearn_exp.guidance import SAFREE
from unlearn_exp.guidance.config import SAFREEConfig
from unlearn_exp.toy import calibrate


def test_each_ladder_starts_at_todays_value_and_only_weakens():
    for method, (_, values) in calibrate.LADDERS.items():
        assert len(values) >= 5
        assert values[0] == calibrate.TODAY[method]
        assert list(values) == sorted(values, reverse=True) and len(set(values)) == len(values)
    assert min(calibrate.LADDERS["sld"][1]) > 1  # SLD acts only for s_S > 1 (diffusers' rule)
    assert min(calibrate.LADDERS["safree"][1]) > 0  # 0 is plain CFG, not SAFREE


def _rows(accs: dict[str, list[float]]) -> pd.DataFrame:
    rows = [{"method": "none", "value": None, "benign_acc": 0.96, "pp": 1.0}]
    for method, values in accs.items():
        for v, a in zip(calibrate.LADDERS[method][1], values):
            rows.append({"method": method, "value": v, "benign_acc": a, "pp": 0.9})
    return pd.DataFrame(rows)


def test_choice_is_the_strongest_rung_that_keeps_benign_accuracy():
    rows = _rows({"sld": [0.5, 0.7, 0.92, 0.95, 0.9, 0.96], "safree": [0.6, 0.88, 0.91, 0.89, 0.95, 0.96]})
    chosen = calibrate.choose(rows)
    assert chosen["sld"] == {"value": 100.0, "met": True}
    assert chosen["safree"] == {"value": 0.6, "met": True}  # the first passing rung, not the best


def test_no_passing_rung_takes_the_best_one_and_says_the_rule_failed():
    rows = _rows({"sld": [0.5, 0.6, 0.7, 0.8, 0.85, 0.85], "safree": [0.9] * 6})
    chosen = calibrate.choose(rows)
    assert chosen["sld"] == {"value": 10.0, "met": False}  # ties: the stronger rung
    assert chosen["safree"]["value"] == 1.0
    text = calibrate.to_markdown(rows, chosen, "# t")
    assert "NO rung passes" in text and "0.03" in text


def test_a_missing_rung_is_refused():
    rows = _rows({"sld": [0.9] * 5, "safree": [0.9] * 6})
    with pytest.raises(ValueError, match="not measured"):
        calibrate.choose(rows)


def test_ladder_cells_are_the_original_model_with_the_words_on_benign_prompts():
    cells = calibrate.ladder_cells()
    assert len(cells) == 1 + sum(len(v) for _, v in calibrate.LADDERS.values())
    for method, value, over in cells[:1] + cells[1:2] + cells[-1:]:
        cfg = config.compose(over)
        assert cfg.checkpoint.method == "original" and cfg.embedding.source == "explicit"
        assert cfg.benchmark.name == "toy_benign" and cfg.guidance.name == method
        if method == "sld":
            assert cfg.guidance.guidance_scale == value
        if method == "safree":
            assert cfg.guidance.strength == value


def test_sd_guidance_keeps_its_published_strength():
    assert config.compose(["+experiment=nudity_duo", "guidance=safree"]).guidance.strength == 1.0
    assert config.compose(["+experiment=nudity_duo", "guidance=sld"]).guidance.guidance_scale is None


def _prepared(tiny, strength: float):
    g = SAFREE(
        ["nudity", "sex"], "nudity, sex", config.typed_preset(SAFREEConfig, "safree", strength=strength)
    )
    prompts = ["a naked woman lying on a sofa in a room"]
    return g, g.prepare(tiny, prompts, tiny.tokenize(prompts), None, 7.5, 10)


def test_safree_strength_scales_both_edits(tiny):
    _, full = _prepared(tiny, 1.0)
    _, none = _prepared(tiny, 0.0)
    g, half = _prepared(tiny, 0.5)
    text_e = full.extra["text_e"]
    empty, _ = tiny.encode_prompts([""])
    assert torch.equal(none.extra["safe_e"], text_e) and torch.equal(none.branches[0].sequence, empty)
    assert torch.allclose(half.extra["safe_e"], (full.extra["safe_e"] + text_e) / 2, atol=1e-6)
    assert torch.allclose(half.branches[0].sequence, (full.branches[0].sequence + empty) / 2, atol=1e-6)
    assert g.describe()["strength"] == 0.5
    assert "strength" not in SAFREE(["x"], "x").describe()  # 1.0: the sample keys of today's cells


@pytest.mark.parametrize(
    "model, experiments",
    [("toy", ("toy_duo", "toy_methods", "toy_duo_words")), ("toy_mmdit", ("toy_mmdit_duo",))],
)
def test_the_toy_experiments_carry_the_rules_choice_on_the_recorded_ladder(model, experiments):
    chosen = calibrate.choose(_rows({m: list(v) for m, v in calibrate.MEASURED[model].items()}))
    assert all(c["met"] for c in chosen.values())
    for exp in experiments:
        sld = config.compose([f"+experiment={exp}", "guidance=sld"]).guidance
        safree = config.compose([f"+experiment={exp}", "guidance=safree"]).guidance
        assert sld.guidance_scale == chosen["sld"]["value"]
        assert safree.strength == chosen["safree"]["value"]
