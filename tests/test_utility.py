"""Utility metrics (docs/methods.md 7.5): CLIP score, FID and KID on weights the tests make, the toy's
analogues on a recorded toy cell, and ``report --utility``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import toy_overrides
from tests.helpers.q16 import tiny_open_clip
from unlearn_exp import config
from unlearn_exp.cell import run_cell
from unlearn_exp.errors import UserError
from unlearn_exp.evaluation.utility import InceptionFeatures, distribution_distance, make_utility
from unlearn_exp.hashing import file_sha256
from unlearn_exp.report.reproduce import main
from unlearn_exp.report.utility import utility_table


def _images(n: int, seed: int, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny open_clip model with CLIP's vocabulary size (its tokenizer is CLIP's BPE)."""
    return tiny_open_clip(tmp_path_factory.mktemp("clip"), vocab_size=49408)


def test_clip_score_is_the_clipped_cosine_times_100(clip_dir):
    metric = make_utility(
        {**config.preset("utility", "clip_score"), "model": f"local-dir:{clip_dir}", "device": "cpu"}
    )
    images, prompts = _images(3, 0), ["a cat", "a red car", "a naked person"]
    got = metric.score(images, prompts, [], [None] * 3)
    img = torch.nn.functional.normalize(metric.model.embed(images), dim=-1)
    txt = torch.nn.functional.normalize(metric.model.embed_text(prompts), dim=-1)
    assert got == pytest.approx(float(100 * (img * txt).sum(-1).clamp(min=0).mean()), rel=1e-5)
    assert 0.0 <= got <= 100.0 and metric.profile["name"] == "clip_score"
    with pytest.raises(UserError, match="clip_score open_clip weights not found"):
        make_utility(
            {**config.preset("utility", "clip_score"), "pretrained": "/nowhere/x.bin", "device": "cpu"}
        )


def test_fid_and_kid_are_zero_for_the_same_set_and_grow_apart():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    a, b = _images(12, 1), [im.point(lambda v: min(255, v + 90)) for im in _images(12, 2)]
    same = distribution_distance("fid", net, 8, a, a)
    apart = distribution_distance("fid", net, 8, a, b)
    assert abs(same) < 1e-3 < apart
    assert distribution_distance("kid", net, 8, a, b, subset_size=1000) > distribution_distance(
        "kid", net, 8, a, a
    )
    with pytest.raises(UserError, match="at least two images"):
        distribution_distance("fid", net, 8, a[:1], a)


@pytest.mark.slow
def test_inception_weights_load_from_a_file_and_are_refused_when_absent_or_foreign(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    net = inception_v3(weights=None, aux_logits=True, init_weights=True)
    save_file(
        {k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "inception.safetensors")
    )
    fid = make_utility(
        {
            **config.preset("utility", "fid"),
            "inception_path": str(tmp_path / "inception.safetensors"),
            "device": "cpu",
        }
    )
    images = _images(4, 3, size=64)
    from unlearn_exp.evaluation.images import to_tensor

    feats = fid.features((to_tensor(images) + 1) / 2)
    assert feats.shape == (4, 2048) and torch.isfinite(feats).all()
    # FID and KID on these features: tested on a small network above (four images cannot give a
    # stable 2048-d covariance); the file's content is part of the metric's identity
    assert fid.profile["inception_sha256"] == file_sha256(tmp_path / "inception.safetensors")
    with pytest.raises(UserError, match="need Inception-v3 weights"):
        make_utility(config.preset("utility", "kid"))
    save_file({"fc.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="is not torchvision's Inception-v3"):
        InceptionFeatures(str(tmp_path / "other.safetensors"))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    root = tmp_path_factory.mktemp("utility")
    run_cell(config.compose(toy_overrides(root, "pp.prompts.n=6")))
    return root / "results"


def test_toy_analogues_on_a_recorded_cell(recorded, tmp_path, capsys):
    table = utility_table([recorded], ["toy_clip_score", "toy_fid", "toy_kid"])
    row = table.iloc[0]
    assert row["n"] == 6 and 0.0 <= row["toy_clip_score"] <= 100.0
    assert row["toy_fid"] >= 0.0 and math.isfinite(row["toy_kid"])
    args = [
        "--scale",
        "toy",
        "--utility",
        "toy_clip_score,toy_fid",
        "--results",
        str(recorded),
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    assert "| toy_clip_score | toy_fid |" in capsys.readouterr().out
    assert (tmp_path / "toy" / "utility.csv").is_file()
    assert main(["--utility", "fidd", "--results", str(recorded), "--out", str(tmp_path)]) == 2
    assert "unknown utility metric 'fidd'" in capsys.readouterr().err


def test_utility_columns_join_the_main_and_long_tables(recorded):
    import pandas as pd

    from unlearn_exp.report import formatted
    from unlearn_exp.report.tables import Column, Table, load_cells
    from unlearn_exp.report.utility import add_utility_columns

    cell = load_cells([recorded]).iloc[0]
    data = pd.DataFrame({"method": ["DUO", "DUO+SLD"], "cell_key": [cell["cell_key"], None]})
    tables = {
        "long_toy": Table("long_toy", "t", data, [Column("method", "Method", "Method", "text")], [cell]),
        "transfer": Table("transfer", "t", data.copy(), [], [cell]),  # not a main or long table
    }
    add_utility_columns(tables, ["toy_clip_score"])
    shown = formatted(tables["long_toy"])
    want = utility_table([recorded], ["toy_clip_score"]).iloc[0]["toy_clip_score"]
    assert shown["toy_clip_score"].tolist() == [f"{want:.4g}", "-"]
    assert "toy_clip_score" not in tables["transfer"].data
