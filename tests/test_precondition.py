"""The precondition measurements of finding (a): the direction probe and the table."""

from __future__ import annotations

import math

import torch

from unlearn_exp.guidance.base import Guidance
from unlearn_exp.guidance.probe import DirectionProbe
from unlearn_exp.precondition import precondition_table, to_markdown
from unlearn_exp.sampling import sample


def test_probe_follows_the_unguided_trajectory_and_measures_the_cosine(tiny):
    prompts, seeds = ["a grape on a table", "a plum"], [1, 2]
    with torch.no_grad():
        plain = sample(tiny, prompts, seeds, Guidance(), steps=3).images
        same = DirectionProbe("purple", ["purple"])  # the same text twice: the directions coincide
        probed = sample(tiny, prompts, seeds, same, steps=3).images
        other = DirectionProbe("purple", ["a green field"])
        sample(tiny, prompts, seeds, other, steps=3)
    torch.testing.assert_close(probed, plain, atol=1e-5, rtol=0)  # CFG's own trajectory
    assert len(same.cosines) == 3 and all(c.shape == (2,) for c in same.cosines)
    assert torch.allclose(torch.cat(same.cosines), torch.ones(6), atol=1e-5)
    assert torch.cat(other.cosines).max() < 0.999  # different texts: different directions


def test_precondition_table_rows_per_beta():
    cell = {"dsr": 0.5, "dsr_lo": 0.4, "dsr_hi": 0.6}
    dsr = {(250, k): cell for k in ("explicit", "synonym", "indirect")}
    table = precondition_table(
        dsr, {250: {"cos_mean": 0.8, "cos_sd": 0.1}, 500: {"cos_mean": 0.2, "cos_sd": 0.3}}
    )
    assert table.beta.tolist() == [250, 500] and math.isnan(table.dsr_explicit[1])
    md = to_markdown(table)
    assert "| 250 | 0.500 [0.40, 0.60] | 0.500 [0.40, 0.60] | 0.500 [0.40, 0.60] | 0.800 ± 0.100 |" in md


def test_direction_alignment_is_cached_by_the_cells_identity(tmp_path, monkeypatch):
    from tests.helpers import compose
    from unlearn_exp import precondition

    calls = []

    def measured(cfg, batch_size):
        calls.append(cfg.checkpoint.beta)
        return {"cos_mean": 0.5, "cos_sd": 0.1, "n_images": 48}

    monkeypatch.setattr(precondition, "_measure_alignment", measured)

    def cfg(beta):
        return compose(
            [
                "+experiment=toy_duo",
                f"checkpoint.beta={beta}",
                "guidance=sld",
                "embedding=inverted",
                f"paths.cache_dir={tmp_path}",
            ],
            hydra=False,
        )

    assert precondition.direction_alignment(cfg(250))["cos_mean"] == 0.5
    assert precondition.direction_alignment(cfg(250))["n_images"] == 48  # from the cache
    precondition.direction_alignment(cfg(500))  # another checkpoint: measured again
    assert calls == [250, 500]
