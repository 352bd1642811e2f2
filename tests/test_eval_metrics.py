"""DSR with its Wilson interval, PP distances (LPIPS with a local AlexNet trunk, feature distance),
records."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from unlearn_exp.errors import UserError
from unlearn_exp.evaluation import (
    CELL_COLUMNS,
    IMAGE_COLUMNS,
    FeatureDistance,
    cell_table,
    dsr,
    image_table,
    make_pp_metric,
    read_table,
    register_pp_metric,
    write_table,
)
from unlearn_exp.evaluation.pp import ALEXNET_FILE, pp
from unlearn_exp.evaluation.records import load_json_cell


def test_dsr_wilson_interval():
    r = dsr([True] * 5 + [False] * 5)
    assert r["dsr"] == 0.5 and r["n"] == 10 and r["n_safe"] == 5
    assert r["lo"] == pytest.approx(0.2366, abs=1e-4) and r["hi"] == pytest.approx(0.7634, abs=1e-4)
    r = dsr([False] * 10)
    assert r["dsr"] == 0.0 and r["lo"] == 0.0 and r["hi"] == pytest.approx(0.2775, abs=1e-4)
    r = dsr([True] * 81 + [False] * 14)
    assert r["lo"] < 81 / 95 < r["hi"] and r["hi"] - r["lo"] < 0.16
    empty = dsr([])
    assert empty["n"] == 0 and math.isnan(empty["dsr"])


# --------------------------------------------------------------------------- PP
@pytest.fixture(scope="module")
def trunk(tmp_path_factory):
    import torchvision

    path = tmp_path_factory.mktemp("torchhub") / ALEXNET_FILE
    torch.manual_seed(0)
    features = torchvision.models.alexnet().features  # a stand-in trunk with the ImageNet file's layout
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path


def pairs():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 3, 64, 64, generator=g) * 2 - 1
    b = a.clone()
    b[2] = torch.rand(3, 64, 64, generator=g) * 2 - 1
    b[3] = (a[3] + 0.2 * torch.randn(3, 64, 64, generator=g)).clamp(-1, 1)
    return a, b


def test_lpips_pp_identical_is_one_and_different_lower(trunk):
    metric = make_pp_metric({"trunk_path": str(trunk), "batch_size": 3})
    a, b = pairs()
    d = metric.distance(a, b)
    assert d.shape == (4,) and d[:2].abs().max() < 1e-6
    assert d[2] > d[3] > 0  # unrelated image further than a noisy copy
    assert pp(metric.distance(a, a)) == pytest.approx(1.0, abs=1e-6)
    assert pp(d) < 1.0
    prof = metric.profile
    assert prof["name"] == "lpips_alex" and prof["net"] == "alex" and len(prof["trunk_sha256"]) == 64
    from PIL import Image

    pil = [Image.fromarray(((x.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()) for x in a[:2]]
    assert metric.distance(pil, pil).abs().max() < 1e-6


def test_lpips_missing_or_corrupt_trunk(tmp_path):
    absent = tmp_path / "hub" / ALEXNET_FILE
    with pytest.raises(UserError, match=f"AlexNet trunk {ALEXNET_FILE}.*put it at") as err:
        make_pp_metric({"trunk_path": str(absent)}, cache=False)
    assert "\n" not in str(err.value) and str(absent) in str(err.value)
    absent.parent.mkdir()
    absent.write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read the AlexNet trunk"):
        make_pp_metric({"trunk_path": str(absent)}, cache=False)
    torch.save({"features.0.weight": torch.zeros(1)}, absent)
    with pytest.raises(UserError, match="not torchvision AlexNet weights"):
        make_pp_metric({"trunk_path": str(absent)}, cache=False)


def test_feature_distance_profile():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, stride=2)
    )

    def features(x):
        h1 = net[1](net[0](x))
        return [h1, net[2](h1), h1.mean(dim=(2, 3))]

    metric = FeatureDistance(features, "toy_features", model_sha256="abc", batch_size=2)
    a, b = pairs()
    d = metric.distance(a, b)
    assert d[:2].abs().max() < 1e-6 and d[2] > d[3] > 0 and (d <= 4).all()
    assert torch.allclose(d, metric.distance(b, a))
    assert metric.profile["name"] == "toy_features" and metric.profile["hash"]
    register_pp_metric("toy_test_features", lambda cfg: metric)
    assert make_pp_metric({"name": "toy_test_features"}) is metric
    with pytest.raises(UserError, match="unknown PP metric"):
        make_pp_metric({"name": "nope"})
    with pytest.raises(UserError, match="pairwise"):
        metric.distance(a, b[:3])


# --------------------------------------------------------------------------- records
def test_records_roundtrip_atomic(tmp_path):
    images = image_table(
        [
            {
                "cell_key": "c1",
                "case_id": "250",
                "prompt": 'a, "quoted"\nprompt',
                "seed": 7,
                "image_index": 0,
                "safe": True,
                "score": 0.0,
                "judge_raw": {"detections": []},
                "lpips": 0.12,
            },
            {
                "cell_key": "c1",
                "case_id": "362",
                "prompt": "p",
                "seed": 8,
                "image_index": 0,
                "safe": False,
                "score": 0.7,
                "judge_raw": {"detections": [{"class": "ANUS_EXPOSED"}]},
                "lpips": None,
            },
        ]
    )
    assert list(images.columns) == IMAGE_COLUMNS
    path = write_table(images, tmp_path / "res" / "images")
    assert path.suffix == ".parquet" and path.with_suffix(".csv").is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["images.csv", "images.parquet"]  # no temp files
    back = read_table(path)
    assert back.prompt[0] == 'a, "quoted"\nprompt' and back.case_id.tolist() == ["250", "362"]
    assert load_json_cell(back.judge_raw[1])["detections"][0]["class"] == "ANUS_EXPOSED"
    csv = read_table(path.with_suffix(".csv"))
    assert csv.case_id.tolist() == ["250", "362"] and csv.seed.tolist() == [7, 8]

    cells = cell_table([{"cell_key": "c1", "dsr": 0.5, "config_json": {"a": 1}, "judge_hash": "h"}])
    assert list(cells.columns) == CELL_COLUMNS
    write_table(cells, tmp_path / "cells.parquet", csv=False)
    assert load_json_cell(read_table(tmp_path / "cells.parquet").config_json[0]) == {"a": 1}
    with pytest.raises(UserError, match="unknown result columns"):
        cell_table([{"dsr_typo": 1}])
    with pytest.raises(UserError, match="not found"):
        read_table(tmp_path / "absent.parquet")
    assert isinstance(read_table(path), pd.DataFrame)
