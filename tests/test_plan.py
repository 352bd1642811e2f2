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
    key = "toy:0123@cpu:test (2 threads)"
    text = plan.render([before], {key: costs}, key)
    assert "12 images to sample (128 UNet rows), 0 training steps" in text
    # 2.5 s to sample; the cached DUO checkpoint's 6120 s are what the cache saves
    assert "estimated time: under 0:01 h:mm" in text and "the cache saves 100% of it (about 1:42 h:mm" in text
    old = plan.render([before], {key: {"s_per_image_step": 0.5, "s_per_train_step": 2}}, key)
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
@pytest.mark.parametrize("model", ["tiny", "tiny_sd3"])
def test_calibrate_writes_this_machines_costs(tmp_path, model):
    cfg = compose([f"model={model}"], hydra=False)
    table = plan.calibrate(cfg, tmp_path / "calibration.json")
    saved = json.loads((tmp_path / "calibration.json").read_text())
    key = plan.calibration_key(cfg.model)  # the weights' content and this machine's device
    assert key.startswith(f"{model}:") and key.endswith("@" + plan.device_identity("cpu"))
    assert saved == json.loads(json.dumps(table)) and saved[key]["device"] == "cpu"
    assert all(saved[key][k] >= 0 for k in plan.CALIBRATION_KEYS)
    assert saved[key]["s_per_unet_row"] > 0 and saved[key]["s_per_train_row"] > 0
    assert saved[key]["sampling_batch"] == int(cfg.sampling.batch_size)
    assert plan._costs(saved, key)[0] is not None


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


def test_durations_read_as_hours_and_minutes():
    assert plan.hmm(105 * 60) == "about 1:45 h:mm"
    assert plan.hmm(0) == "about 0:00 h:mm" and plan.hmm(20) == "under 0:01 h:mm"
    assert plan.hmm(25 * 3600 + 29) == "about 25:00 h:mm"


def test_gpu_memory_of_sd14_from_the_published_sizes():
    """Without SD v1.4's folder, its published sizes; the stages' estimates follow the documented formula."""
    from unlearn_exp.models import memory as pm

    cfg = compose(["+experiment=nudity_duo", "model.path=/nonexistent/sd14"], hydra=False)
    sizes = pm.model_sizes(cfg.model)
    assert sizes.source == "from the published sizes"
    assert sizes.params == {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}
    for part, config in pm.PUBLISHED_CONFIGS["sd14"].items():  # the configs give the published sizes
        assert sum(t.numel() for t in pm._meta_module(part, config).parameters()) == sizes.params[part]
    assert sizes.latent == (4, 64) and sizes.unet_elements() == 2_375_680
    # LoRA rank 32 on self-attention's q, k, v, out: 8 x 32 x (5 x 320 + 5 x 640 + 6 x 1280) parameters
    assert sizes.lora_params(32, list(cfg.checkpoint.target_modules)) == 8 * 32 * 12_480
    stages = pm.cell_stages(cfg, sizes, branches=3)
    sampling, duo = stages["sampling"], stages["duo"]
    assert sampling.weights == 2 * sum(sizes.params.values())  # float16 on a GPU
    per, fixed = pm.ACTIVATION["unet_infer"]
    unet = (per * 4 * 3 + fixed) * 2_375_680 * 2  # 4 images x 3 rows (SLD), float16
    decode = pm.activation_bytes("vae_decode", sizes.vae_elements(), 4, 2)
    assert sampling.activations == max(unet, decode) and sampling.what == "4 images x 3 UNet rows"
    assert 3 * pm.GIB < sampling.peak < 8 * pm.GIB
    assert duo.peak > stages["inversion"].peak > sampling.peak / 2 and duo.held >= 16 * 8 * 32 * 12_480
    assert pm.fit_verdict(duo.peak, 80) == "fits 80 GiB" and "NOT fit" in pm.fit_verdict(duo.peak, 8)
    assert pm.fit_verdict(duo.peak, None) == ""


def test_gpu_memory_counted_from_the_model_folder(tmp_path):
    """The toy's folder: counted from its safetensors headers, or from its config.json files alone on
    the meta device (the same counts); the tiny model likewise; both get tiny figures."""
    from safetensors.torch import load_file

    from unlearn_exp.models import memory as pm

    cfg = compose(["model=toy"], hydra=False)
    sizes = pm.model_sizes(cfg.model)
    folder = pm.Path(str(sizes.source).removeprefix("counted from "))
    for part in ("unet", "text_encoder"):
        weights = load_file(next((folder / part).glob("*.safetensors")))
        assert sizes.params[part] == sum(t.numel() for t in weights.values())
        (tmp_path / part).mkdir()
        (tmp_path / part / "config.json").write_text((folder / part / "config.json").read_text())
    configs_only = pm.model_sizes(compose(["model=toy", f"model.path={tmp_path}"], hydra=False).model)
    assert configs_only.params == sizes.params and configs_only.linears == sizes.linears
    assert "vae" not in sizes.params and sizes.latent == (3, 16)

    tiny_cfg = compose(["model=tiny"], hydra=False)
    tiny = pm.model_sizes(tiny_cfg.model)
    from unlearn_exp.models.tiny import build_tiny

    built = build_tiny(seed=0, resolution=32)
    assert tiny.params == {p: sum(x.numel() for x in m.parameters()) for p, m in built.modules().items()}
    for s in [*pm.cell_stages(cfg, sizes, 3).values(), *pm.cell_stages(tiny_cfg, tiny, 2).values()]:
        assert 0 < s.peak < 0.1 * pm.GIB, s


def test_a_calibration_holds_for_its_weights_and_device_only():
    cfg = compose(["model=toy"], hydra=False)
    key = plan.calibration_key(cfg.model)
    from unlearn_exp.identity import model_identity

    assert key == f"{model_identity(cfg.model)}@{plan.device_identity('cpu')}"
    costs = {k: 1.0 for k in plan.CALIBRATION_KEYS}
    assert plan._costs({key: costs}, key) == (costs, "")
    other_device = key.rsplit("@", 1)[0] + "@cuda:Some Other GPU"
    found, why = plan._costs({other_device: costs, "toy": costs}, key)
    assert found is None and f"no calibration for {key}" in why
    assert "keyed by model name only (toy) are ignored" in why and "--calibrate" in why
    absent = compose(["model=sd14", "model.path=/nonexistent/sd14"], hydra=False)
    assert plan.calibration_key(absent.model) is None
    assert "weights are not here" in plan._costs({key: costs}, None)[1]


def test_an_absent_prompt_list_is_one_warning_for_the_plan(tmp_path):
    """COCO's PP prompts not in the data cache: one warning naming pp.prompts.path, the reason and the
    images left out (the cells' own 1000 each, the original model's 1000 references once), no note
    per cell, and totals marked as a lower bound. A user file that is not there: its path, and an
    unknown number of images."""
    cells = [["guidance=none"], ["guidance=sld"]]
    plans = []
    for c in cells:
        over = toy_overrides(tmp_path, "pp=lpips_coco", f"paths.data_dir={tmp_path / 'data'}", *c)
        over = [o for o in over if o != "pp.prompts.n=4"]  # COCO's list, not the toy's benign one
        plans.append(plan.plan_cell(compose(over, hydra=False), c, set()))
    assert all(not p.notes for p in plans)
    text = plan.render(plans, None, None)
    warnings = [line for line in text.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, warnings
    w = warnings[0]
    assert "'coco_pp' (pp.prompts.path)" in w and "not in the data cache" in w and "downloads nothing" in w
    assert "2 cell(s)" in w and "3,000 images" in w and "gives 1,000 images a set" in w and "lower bound" in w
    assert str(tmp_path / "data" / "coco_pp") in w  # the path the list would have, whole
    # the benchmark's 4 images per cell and the original model's 4 references: the list is not counted
    assert "at least 12 images to sample" in text

    over = toy_overrides(tmp_path, "benchmark=prompts_file", "benchmark.path=/nonexistent/prompts.csv")
    p = plan.plan_cell(compose(over, hydra=False), [], set())
    w = [line for line in plan.render([p], None, None).splitlines() if line.startswith("warning:")]
    assert len(w) == 1 and "no file at benchmark.path=/nonexistent/prompts.csv" in w[0]
    assert "an unknown number of images" in w[0]


def test_the_command_line_says_whether_each_stage_fits(tmp_path, capsys, monkeypatch):
    """``--gpu-memory`` among the overrides: each cell's peak and the stage table say whether it fits."""
    monkeypatch.setenv("UNLEARN_EXP_CALIBRATION", str(tmp_path / "calibration.json"))
    assert (
        plan.main([*toy_overrides(tmp_path)[:2], "--gpu-memory", "0.02", *toy_overrides(tmp_path)[2:]]) == 0
    )
    out = capsys.readouterr().out
    assert "[ 1/1] " in out and "GPU peak ~0.03 GiB (sampling, classifier-free guidance): does NOT fit" in out
    assert "GPU memory per stage (an estimate; unet 1.0M, text_encoder 2.0M parameters, counted from" in out
    assert "judging (toy on the CPU, PP toy_features): ~0.01 GiB" in out and "a 0.02 GiB card" in out


@pytest.mark.parametrize(
    ("model", "experiment"), [("tiny", "nudity_methods"), ("tiny_sd3", "nudity_methods_sd3")]
)
def test_plan_counts_esd_training_and_finds_esd_and_uce_in_the_cache(tmp_path, model, experiment):
    """ESD is planned as DUO is: its steps, its artifact under the key the trainer writes (cached once
    built), and its GPU memory from the parameters its variant trains; UCE's closed form is listed."""
    from unlearn_exp.hashing import to_plain
    from unlearn_exp.models.loading import load_model
    from unlearn_exp.unlearning import apply_checkpoint
    from unlearn_exp.unlearning.esd import esd_parameter_names

    base = [f"+experiment={experiment}", f"model={model}", "guidance=none", f"paths.root_dir={tmp_path}"]
    esd = [
        *base,
        "checkpoint=esd_x",
        "checkpoint.steps=2",
        "checkpoint.ddim_steps=2",
        "checkpoint.checkpoint_every=1",
    ]
    cfg = compose(esd, hydra=False)
    p = plan.with_memory(plan.plan_cell(cfg, esd, set()), cfg)
    assert p.train_steps == 2 and [w.kind for w in p.work if w.kind in plan.TRAIN] == ["esd"]
    assert p.artifacts[0][0].startswith("ESD checkpoint esd-x") and not p.artifacts[0][1]
    comps = load_model(cfg.model)
    trained = sum(
        dict(comps.denoiser.named_parameters())[n].numel()
        for n in esd_parameter_names(comps.denoiser, "esd-x", comps.family)
    )
    stage = p.stages["esd"]
    assert stage.name == "ESD training" and stage.held == 16 * trained and stage.activations > 0
    costs = {"s_per_unet_row": 0.01, "s_per_image": 0.1, "s_per_inversion_step": 1.0, "s_per_train_row": 0.5}
    work = next(w for w in p.work if w.kind == "esd")  # 1 row trained, 2 x (0.5 + 1) frozen rows a step
    assert work.rows == 3 and plan.work_seconds(work, costs) == pytest.approx(2 * (0.5 + 3 * 0.01))

    apply_checkpoint(comps, cfg.checkpoint, plan._cache(cfg), task_cfg=to_plain(cfg.task))
    after = plan.plan_cell(cfg, esd, set())
    assert after.train_steps == 0 and after.train_steps_cached == 2 and after.artifacts[0][1]

    uce = [*base, "checkpoint=uce"]
    cfg = compose(uce, hydra=False)
    assert plan.plan_cell(cfg, uce, set()).artifacts[0] == (
        plan.plan_cell(cfg, uce, set()).artifacts[0][0],
        False,
    )
    apply_checkpoint(load_model(cfg.model), cfg.checkpoint, plan._cache(cfg), task_cfg=to_plain(cfg.task))
    found = plan.plan_cell(cfg, uce, set()).artifacts[0]
    assert found[0].startswith("UCE edit, closed form") and found[1]
