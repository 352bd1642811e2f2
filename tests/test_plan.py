"""The sweep cost planner: what a cell needs, what the cache holds, checked against what running the
cell then builds."""

from __future__ import annotations

import json

from tests.conftest import compose
from tests.test_integrity import toy_overrides
from unlearn_exp import plan
from unlearn_exp.cell import run_cell


def test_plan_matches_what_the_cell_then_builds(tmp_path, monkeypatch):
    over = toy_overrides(tmp_path, "guidance=sld")
    before = plan.plan_cell(compose(over, hydra=False), over, set())
    assert not before.done and before.train_steps == 0  # DUO beta=2000 ships with the project
    assert ("DUO checkpoint beta=2000" in before.artifacts[0][0]) and before.artifacts[0][1]
    # 4 benchmark images + 4 benign ones + the original model's 4 benign references
    assert before.images == 12 and before.images_cached == 0 and before.sampling_steps == 12 * 4

    out = run_cell(compose(over, hydra=False))
    built_samples = [b for b in out["artifacts"]["built"] if b.startswith("samples/")]
    assert len(built_samples) == 6  # chunks of 2: what the plan counted, in chunks

    done = plan._done_spec_keys(tmp_path / "results")
    after = plan.plan_cell(compose(over, hydra=False), over, done)
    assert after.done and after.images == 0 and after.images_cached == 12

    monkeypatch.setenv("UNLEARN_EXP_CALIBRATION", str(tmp_path / "calibration.json"))
    (tmp_path / "calibration.json").write_text(
        json.dumps({"toy": {"s_per_image_step": 0.5, "s_per_train_step": 2}})
    )
    calib = json.loads((tmp_path / "calibration.json").read_text())
    assert plan._estimate(before, calib, "toy") == 12 * 4 * 0.5
    text = plan.render([before, after], calib, "toy")
    # 12 images to sample against 12 cached, and DUO's 300 steps cached in both: (12 + 600) / 624
    assert "12 images to sample" in text and "the cache saves 98% of the work" in text
    assert "estimated time" in text


def test_a_shipped_concept_needs_no_image_set(tmp_path):
    """C* for beta=2000 ships with the project: its image set is neither planned nor made."""
    # the toy's own sampler: the image set's key (and so C*'s) names it
    over = [
        o for o in toy_overrides(tmp_path, "guidance=sld", "embedding=inverted") if o != "sampling.steps=4"
    ]
    before = plan.plan_cell(compose(over, hydra=False), over, set())
    assert [what.split(" (")[0] for what, _ in before.artifacts] == [
        "DUO checkpoint beta=2000",
        "C* on duo beta=2000",
    ]
    assert all(cached for _, cached in before.artifacts) and before.images == 12
    assert before.sampling_steps == 12 * 25
    out = run_cell(compose(over, hydra=False))
    built = out["artifacts"]["built"]
    assert not [b for b in built if b.startswith("image_sets/")], built
    assert len([b for b in built if b.startswith("samples/")]) == 6


def test_plan_counts_training_that_is_not_cached(tmp_path):
    over = toy_overrides(tmp_path, "guidance=sld", "embedding=inverted", "checkpoint.beta=300",
                         "paths.shipped_caches=[]")  # fmt: skip
    p = plan.plan_cell(compose(over, hydra=False), over, set())
    cfg = compose(over, hydra=False)
    duo_steps = 300  # the toy recipe's one adapter
    assert p.train_steps == duo_steps + int(cfg.inversion.steps)
    assert [cached for _, cached in p.artifacts] == [False, False, False, False]  # DUO, pairs, image set, C*
    assert p.images >= 2 * 48 + int(cfg.inversion.image_set.n_images)  # pairs and the image set at least


def test_calibrate_writes_this_machines_costs(tmp_path):
    cfg = compose(["model=tiny"], hydra=False)
    table = plan.calibrate(cfg, tmp_path / "calibration.json")
    saved = json.loads((tmp_path / "calibration.json").read_text())
    assert saved == json.loads(json.dumps(table)) and saved["tiny"]["s_per_image_step"] > 0
    assert saved["tiny"]["s_per_train_step"] > 0 and saved["tiny"]["device"] == "cpu"
