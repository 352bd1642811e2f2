"""The sweep cost planner: what a cell needs, what the cache holds, checked against what running the
cell then builds."""

from __future__ import annotations

import json

import pytest

from tests.helpers import compose, toy_overrides
from unlearn_exp import plan
from unlearn_exp.cell import run_cell


def _sampled_rows() -> int:
    from unlearn_exp import sampling

    return sampling.UNET_ROWS


@pytest.mark.slow
def test_plan_matches_what_the_cell_then_builds(tmp_path, monkeypatch):
    over = toy_overrides(tmp_path, "guidance=sld")
    before = plan.plan_cell(compose(over, hydra=False), over, set())
    assert not before.done and before.train_steps == 0  # DUO beta=2000 ships with the project
    assert ("DUO checkpoint beta=2000" in before.artifacts[0][0]) and before.artifacts[0][1]
    # 4 benchmark images + 4 benign ones + the original model's 4 benign references
    assert before.images == 12 and before.images_cached == 0
    # 4 steps; SLD's three branches for the cell's 8 images, classifier-free guidance's two for the 4
    assert before.unet_rows == 8 * 4 * 3 + 4 * 4 * 2

    rows = _sampled_rows()
    out = run_cell(compose(over, hydra=False))
    assert _sampled_rows() - rows == before.unet_rows  # what the sampler then ran, row for row
    built_samples = [b for b in out["artifacts"]["built"] if b.startswith("samples/")]
    assert len(built_samples) == 6  # chunks of 2: what the plan counted, in chunks
    assert {w.key for w in before.work if w.kind == "images"} == {
        f"samples/{b.split('/')[1]}" for b in built_samples
    }

    done = plan._done_spec_keys(tmp_path / "results")
    after = plan.plan_cell(compose(over, hydra=False), over, done)
    assert after.done and after.images == 0 and after.images_cached == 12

    costs = {"s_per_unet_row": 0.01, "s_per_image": 0.1, "s_per_inversion_step": 1.0, "s_per_train_row": 0.5}
    assert plan._estimate(before.work[1:], costs) == pytest.approx(128 * 0.01 + 12 * 0.1)
    duo = before.work[0]  # cached: 1000 steps of 3 x 4 rows forward and backward, and forward
    assert (
        duo.kind == "duo" and duo.cached and plan.work_seconds(duo, costs) == pytest.approx(1000 * 12 * 0.51)
    )
    monkeypatch.setenv("UNLEARN_EXP_CALIBRATION", str(tmp_path / "calibration.json"))
    text = plan.render([before], {"toy": costs}, "toy")
    assert "12 images to sample (128 UNet rows), 0 training steps" in text
    assert "estimated time: 0.0 min" in text and "the cache saves 100% of it" in text
    old = plan.render([before], {"toy": {"s_per_image_step": 0.5, "s_per_train_step": 2}}, "toy")
    assert "estimated time" not in old and "older version" in old  # an old calibration is not misread


@pytest.mark.slow
def test_a_sweep_counts_shared_work_once(tmp_path):
    """Two cells of one checkpoint share the original model's references: the plan counts them for the
    first cell only, and its totals are what running the two cells then samples."""
    overs = [toy_overrides(tmp_path, "guidance=none"), toy_overrides(tmp_path, "guidance=sld")]
    plans = [plan.plan_cell(compose(o, hydra=False), o, set()) for o in overs]
    (own1, shared1), (own2, shared2) = plan.sweep_work(plans)
    assert not shared1 and sum(w.count for w in shared2) == 4  # the original's 4 benign references
    planned_images = sum(w.count for w in own1 + own2)
    planned_rows = sum(w.rows for w in own1 + own2)
    assert (planned_images, planned_rows) == (12 + 8, 12 * 4 * 2 + 8 * 4 * 3)
    text = plan.render(plans, None, "toy")
    assert (
        "4 made by an earlier cell" in text
        and f"{planned_images} images to sample ({planned_rows} UNet" in text
    )

    rows, built = _sampled_rows(), []
    for o in overs:
        built += [
            b for b in run_cell(compose(o, hydra=False))["artifacts"]["built"] if b.startswith("samples/")
        ]
    assert _sampled_rows() - rows == planned_rows
    assert len(built) == planned_images // 2  # chunks of 2


@pytest.mark.slow
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
    assert before.unet_rows == 8 * 15 * 3 + 4 * 15 * 2
    out = run_cell(compose(over, hydra=False))
    built = out["artifacts"]["built"]
    assert not [b for b in built if b.startswith("image_sets/")], built
    assert len([b for b in built if b.startswith("samples/")]) == 6


def test_plan_counts_training_that_is_not_cached(tmp_path):
    over = toy_overrides(
        tmp_path, "guidance=sld", "embedding=inverted", "checkpoint.beta=300", "paths.shipped_caches=[]"
    )
    p = plan.plan_cell(compose(over, hydra=False), over, set())
    cfg = compose(over, hydra=False)
    duo_steps = 1000  # the toy recipe's one adapter
    assert p.train_steps == duo_steps + int(cfg.inversion.steps)
    assert [cached for _, cached in p.artifacts] == [False, False, False, False]  # DUO, pairs, image set, C*
    assert p.images >= 2 * 48 + int(cfg.inversion.image_set.n_images)  # pairs and the image set at least


@pytest.mark.slow
def test_calibrate_writes_this_machines_costs(tmp_path):
    cfg = compose(["model=tiny"], hydra=False)
    table = plan.calibrate(cfg, tmp_path / "calibration.json")
    saved = json.loads((tmp_path / "calibration.json").read_text())
    assert saved == json.loads(json.dumps(table)) and saved["tiny"]["device"] == "cpu"
    assert all(saved["tiny"][k] >= 0 for k in plan.CALIBRATION_KEYS)
    assert saved["tiny"]["s_per_unet_row"] > 0 and saved["tiny"]["s_per_train_row"] > 0
    assert saved["tiny"]["sampling_batch"] == int(cfg.sampling.batch_size)
    assert plan._costs(saved, "tiny") is not None


@pytest.mark.slow
def test_a_concept_not_yet_named_is_counted_once_per_checkpoint(tmp_path):
    """``inversion.image_set.source=duo_pairs`` (the paper's nudity grid): C*'s key is known only once
    its pairs exist, yet SLD and SAFREE of one checkpoint and the ``shared`` cells of other betas use
    one C*, so the plan counts one inversion per checkpoint it is learned on."""
    base = ["+experiment=nudity_duo", "model=tiny", f"paths.root_dir={tmp_path}"]
    cells = [
        ["checkpoint.beta=2000", "guidance=sld", "embedding=inverted"],
        ["checkpoint.beta=2000", "guidance=safree", "embedding=inverted"],
        ["checkpoint.beta=500", "guidance=sld", "embedding=inverted"],
        ["checkpoint.beta=2000", "guidance=sld", "embedding=shared"],  # C* of beta 500
    ]
    plans = [plan.plan_cell(compose([*base, *c], hydra=False), c, set()) for c in cells]
    assert compose(base, hydra=False).inversion.image_set.source == "duo_pairs"
    keys = [[w.key for w in p.work if w.kind == "inversion"] for p in plans]
    assert all(len(k) == 1 for k in keys)
    assert keys[0] == keys[1] and keys[2] == keys[3] and keys[0] != keys[2]
    own = [w for o, _ in plan.sweep_work(plans) for w in o if w.kind == "inversion"]
    steps = int(compose(base, hydra=False).inversion.steps)
    assert sum(w.count for w in own) == 2 * steps  # beta 2000's and beta 500's


def test_an_override_of_a_swept_key_restricts_the_plan_as_the_launcher_does(tmp_path, capsys):
    """``checkpoint.beta=500`` on the command line replaces the sweep's betas (Hydra's launcher runs
    one beta): the planner lists those cells only and says so, instead of 28 cells of four betas."""
    from unlearn_exp.demo import grid

    over = ["+experiment=toy_duo", "checkpoint.beta=500", f"paths.results_dir={tmp_path}"]
    cells = grid(over)
    assert len(cells) == 7 and all("checkpoint.beta=500" in c for c in cells)  # none once + 2 x 3
    assert len(grid(["+experiment=toy_duo", "checkpoint.beta=500,1000"])) == 14
    note = plan.pinned_note(over, len(cells))
    assert "checkpoint.beta=500" in note and "7 cell(s)" in note
    assert plan.pinned_note(["+experiment=toy_duo"], 28) == ""
    plans, _ = plan.plan(["+experiment=toy_duo", "checkpoint.beta=500,1000", f"paths.results_dir={tmp_path}"])
    assert len(plans) == 14
    assert "500,1000" in plan.pinned_note(["+experiment=toy_duo", "checkpoint.beta=500,1000"], 14)
