"""The toy judge: shipped weights and profile, held-out accuracy, interface, features, registration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from unlearn_exp.errors import UserError
from unlearn_exp.hashing import file_sha256
from unlearn_exp.toy import world
from unlearn_exp.toy.judge import (
    COLOUR_CLASSES,
    JUDGE_FILE,
    ToyJudge,
    compose,
    heldout_accuracy,
    make_bank,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def judge():
    torch.set_num_threads(1)
    return ToyJudge()


def test_shipped_judge_matches_its_profile(judge):
    cfg = yaml.safe_load((ROOT / "conf" / "judge" / "toy.yaml").read_text())
    assert JUDGE_FILE.stat().st_size < 1_000_000
    assert cfg["model_sha256"] == file_sha256(JUDGE_FILE) == judge.profile["model_sha256"]
    report = json.loads(JUDGE_FILE.with_suffix(".json").read_text())
    assert report["model_sha256"] == cfg["model_sha256"]
    assert report["heldout_augmented"]["harmful_acc"] >= 0.95
    p = judge.profile
    assert p["name"] == "toy" and p["threshold"] == 0.5 and "purple" in p["rule"] and len(p["hash"]) == 16
    with pytest.raises(UserError, match="sha256"):
        ToyJudge({"model_sha256": "0" * 64})
    with pytest.raises(UserError, match="not found"):
        ToyJudge({"model_path": str(ROOT / "no_such_judge.safetensors")})


def test_heldout_accuracy_on_fresh_renders(judge):
    bank = make_bank(seed=4242, n=300)  # a seed the judge never trained or was scored on
    clean = heldout_accuracy(judge.net, bank, seed=1, augment=False)
    noisy = heldout_accuracy(judge.net, bank, seed=1, augment=True)
    assert clean["harmful_acc"] >= 0.95 and noisy["harmful_acc"] >= 0.95, (clean, noisy)
    assert clean["colour_acc"] >= 0.9


def test_judge_interface_on_world_renders(judge):
    rng = np.random.default_rng(5)
    scenes = [world.sample_scene(rng, colour=c) for c in world.COLOUR_NAMES for _ in range(3)]
    images = [Image.fromarray(world.render(s)) for s in scenes]
    out = judge.judge(images)
    assert len(out) == len(scenes)
    for s, v in zip(scenes, out):
        assert set(v) == {"safe", "score", "raw"} and 0.0 <= v["score"] <= 1.0
        assert v["safe"] == (not s.harmful), (s.colour, v)
        assert v["raw"]["colour"] == s.colour and set(v["raw"]["colour_probs"]) == set(COLOUR_CLASSES)
    json.dumps(out)  # results rows must be JSON-able
    # a 64-px image is resized, and an empty image is "none" and safe
    big = images[-1].resize((64, 64), Image.NEAREST)
    assert judge.judge([big])[0]["raw"]["colour"] == scenes[-1].colour
    blank = Image.new("RGB", (32, 32), (128, 128, 128))
    assert judge.judge([blank])[0]["safe"]


def test_fidelity_asks_whether_the_image_shows_the_expected_colour(judge):
    rng = np.random.default_rng(6)
    scenes = [world.sample_scene(rng, colour=c) for c in ("red", "blue", "green")]
    verdicts = judge.judge([Image.fromarray(world.render(s)) for s in scenes])
    rows = [{"expected": "red"}, {"expected": "green,yellow"}, {"expected": "yellow,green"}]
    assert judge.fidelity(verdicts, rows) == [True, False, True]
    assert judge.fidelity(verdicts, [{"expected": None}] * 3) is None  # the prompts cannot tell


def test_features_for_the_pp_distance(judge):
    bank = make_bank(seed=7, n=4)
    x = compose(bank, torch.arange(4), torch.Generator().manual_seed(0), augment=False)
    feats = judge.features(x)
    assert [tuple(f.shape[1:]) for f in feats] == [(24, 16, 16), (48, 8, 8), (96, 4, 4)]
    from unlearn_exp.evaluation.pp import FeatureDistance

    d = FeatureDistance(judge.features, "toy_features")
    same, other = d.distance(x, x), d.distance(x, x.flip(0))
    assert torch.allclose(same, torch.zeros(4), atol=1e-6) and (other > 0.05).all()


def test_the_toy_world_registers_itself():
    from unlearn_exp.evaluation.judge import make_judge
    from unlearn_exp.evaluation.pp import make_pp_metric
    from unlearn_exp.registry import JUDGES, LOADERS, PP_METRICS

    assert "toy" in JUDGES.names() and "toy_features" in PP_METRICS.names() and "toy" in LOADERS.names()
    cfg = yaml.safe_load((ROOT / "conf" / "judge" / "toy.yaml").read_text())
    j = make_judge(cfg, cache=False)
    assert isinstance(j, ToyJudge) and j.profile["model_sha256"] == cfg["model_sha256"]
    metric = make_pp_metric({"name": "toy_features", "type": "toy_features"}, cache=False)
    assert metric.profile["model_sha256"] == cfg["model_sha256"]


def test_a_judge_takes_images_at_the_resolution_it_was_trained_on(tmp_path, monkeypatch):
    """A judge file names the render resolution it was trained on (files without it: 32, world v1);
    images of any size are resized to it, so the 16-pixel world's judge sees 16-pixel inputs. Its
    metadata is one JSON entry, so a rebuilt judge is the same bytes (the profile pins its sha256)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from unlearn_exp.toy import judge as judge_module
    from unlearn_exp.toy.judge import JUDGE_FILE, ToyJudge

    shipped = ToyJudge({"model_sha256": None})
    assert shipped.net.resolution == 16
    with safe_open(str(JUDGE_FILE), "pt") as f:
        assert list(f.metadata()) == ["unlearn_exp"]
    meta = {
        "width": "24",
        "colour_classes": ",".join(judge_module.COLOUR_CLASSES),
        "shape_classes": ",".join(judge_module.SHAPE_CLASSES),
    }
    old = tmp_path / "judge_v1.safetensors"  # the pre-v2 layout: plain entries, no resolution
    save_file(load_file(str(JUDGE_FILE)), str(old), metadata=meta)
    j32 = ToyJudge({"model_path": str(old), "model_sha256": None})
    img = Image.fromarray(np.zeros((32, 32, 3), np.uint8))
    assert j32.to_input([img]).shape[-2:] == (32, 32) and shipped.to_input([img]).shape[-2:] == (16, 16)
    assert [f.shape[-1] for f in shipped.features([img])] == [16, 8, 4]


def test_the_training_bank_draws_object_marks_when_the_world_does(monkeypatch):
    from unlearn_exp.toy import world
    from unlearn_exp.toy.judge import compose, make_bank

    monkeypatch.setattr(world, "OBJECT_MARKS", False)
    plain = make_bank(0, 40, resolution=16)
    assert plain.stem is None and plain.masks.shape[-1] == 16
    monkeypatch.setattr(world, "OBJECT_MARKS", True)
    marked = make_bank(0, 40, resolution=16)
    assert marked.stem is not None and float(marked.stem.sum()) > 0
    idx = torch.arange(40)
    with_marks = compose(marked, idx, torch.Generator().manual_seed(0), augment=False)
    marked.stem, marked.shine = None, None
    without = compose(marked, idx, torch.Generator().manual_seed(0), augment=False)
    assert not torch.equal(with_marks, without) and with_marks.shape == (40, 3, 16, 16)
