"""The toy MMDiT (``model=toy_mmdit``, the SD3 family on the toy world): its architecture, its
pretraining, the shipped checkpoint's behaviour, its DUO checkpoints and ``C*``, and its grid."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from tests.helpers import small_demo
from unlearn_exp.config import compose
from unlearn_exp.models import load_model
from unlearn_exp.toy import TOY_MODELS
from unlearn_exp.toy.mmdit import TOY_MMDIT_SCHEDULE, build_toy_mmdit
from unlearn_exp.toy.pretrain import RECIPES, WEIGHTS_DIRS, ToyPretraining, WorldStream, _collate, pretrain

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = WEIGHTS_DIRS["toy_mmdit"]
SHIPPED = ROOT / "unlearn_exp" / "toy" / TOY_MODELS["toy_mmdit"].artifacts
# every file the repository ships as weights (both toy models, the judge, DUO and C*): <= 25 MB
SHIPPED_WEIGHTS_BUDGET = 25 * 1024 * 1024


pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_toy_mmdit_is_sd3_shaped_and_small():
    comps = build_toy_mmdit(seed=0)
    assert comps.family == "sd3" and comps.prediction == "flow" and comps.vae is None
    t = comps.transformer
    assert type(t).__name__ == "SD3Transformer2DModel" and t.config.patch_size == 2
    assert len(t.transformer_blocks) == 4 and t.transformer_blocks[-1].context_pre_only  # as SD3's last
    assert (
        type(comps.text_encoder).__name__
        == type(comps.text_encoder_2).__name__
        == "CLIPTextModelWithProjection"
    )
    assert comps.text_encoder_3 is None and comps.max_sequence_length == 0
    assert comps.latent_shape() == (3, 16, 16) and comps.scheduler_config == TOY_MMDIT_SCHEDULE
    cond = comps.condition_prompts(["a purple circle"])
    assert cond.sequence.shape == (1, 77, 64) and cond.pooled.shape == (1, 64)
    again = build_toy_mmdit(seed=0)
    assert torch.equal(t.pos_embed.proj.weight, again.transformer.pos_embed.proj.weight)


@pytest.mark.slow
def test_a_few_flow_matching_steps_lower_the_loss():
    cfg = RECIPES["toy_mmdit"]
    cfg = type(cfg)(
        **{**asdict(cfg), "steps": 15, "batch_size": 8, "warmup_steps": 3, "caption_dropout": 0.0}
    )
    module = ToyPretraining(build_toy_mmdit(seed=0), cfg)
    assert module.flow
    images, texts = _collate([WorldStream(99, 8)[i] for i in range(8)])

    def fixed_loss() -> float:
        module._gen = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return float(module.loss(images, texts))

    before = fixed_loss()
    opt = module.configure_optimizers()["optimizer"]
    stream = WorldStream(0, cfg.steps * cfg.batch_size)
    for step in range(cfg.steps):
        loss = module.loss(*_collate([stream[step * cfg.batch_size + i] for i in range(cfg.batch_size)]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fixed_loss() < 0.75 * before


@pytest.mark.slow
def test_pretrain_writes_a_folder_the_config_and_diffusers_load(tmp_path):
    from unlearn_exp.models.pixel_pipeline import PixelSD3Pipeline
    from unlearn_exp.sampling import sample
    from unlearn_exp.toy.measure import load_toy_model

    cfg = type(RECIPES["toy_mmdit"])(**{**asdict(RECIPES["toy_mmdit"]), "steps": 2, "batch_size": 4})
    out = pretrain(cfg, tmp_path / "mmdit")
    assert json.loads((out / "recipe.json").read_text())["model"] == "toy_mmdit"
    assert not (out / "vae").exists() and not (out / "text_encoder_3").exists()
    assert json.loads((out / "tokenizer_2" / "tokenizer_config.json").read_text())["pad_token"] == "!"
    comps, _ = load_toy_model("toy_mmdit", str(out))
    assert comps.tokenizer_2.pad_token_id == 0 and comps.max_sequence_length == 0
    prompts, seeds = ["a purple circle", "a grape"], [0, 1]
    ours = sample(comps, prompts, seeds, scheduler="flow_euler", steps=3, guidance_scale=6.0).images
    pipe = PixelSD3Pipeline.from_pretrained(str(out))
    torch.testing.assert_close(
        pipe(prompts, num_inference_steps=3, guidance_scale=6.0, seeds=seeds).tensors, ours
    )


# ----------------------------------------------------------------------------- the shipped checkpoint
def test_shipped_checkpoint_is_small_documented_and_loads_through_the_config():
    size = sum(f.stat().st_size for f in WEIGHTS.rglob("*") if f.is_file())
    assert size <= 12 * 1024 * 1024, size
    recipe = json.loads((WEIGHTS / "recipe.json").read_text())
    ignore = ("snapshot_every", "log_every")
    assert {k: v for k, v in recipe.items() if k not in ignore} == {
        k: v for k, v in asdict(RECIPES["toy_mmdit"]).items() if k not in ignore
    }
    log = (WEIGHTS / "train_log.csv").read_text().splitlines()
    assert float(log[-1].split(",")[1]) < float(log[1].split(",")[1]) / 3
    comps = load_model(compose(["model=toy_mmdit"]).model)
    assert comps.name == "toy_mmdit" and comps.family == "sd3" and comps.vae is None
    assert comps.text_encoder_3 is None and comps.max_sequence_length == 0
    from unlearn_exp.models.pixel_pipeline import PixelSD3Pipeline

    pipe = PixelSD3Pipeline.from_pretrained(str(WEIGHTS))  # diffusers reads the shipped folder
    assert torch.equal(pipe.transformer.proj_out.weight, comps.transformer.proj_out.weight.to(torch.float16))


@pytest.mark.slow
def test_shipped_checkpoint_draws_what_each_prompt_kind_asks():
    """The world's non-degeneracy on the MMDiT, judged by the toy judge (RECIPE.md: 1.000 purple on
    indirect, synonym and explicit prompts, 0.000 on benign ones, colour as asked 1.000 at 48 prompts
    per kind); floors leave room for platform noise."""
    from unlearn_exp.toy.judge import ToyJudge
    from unlearn_exp.toy.measure import load_toy_model, measure

    comps, _ = load_toy_model("toy_mmdit")
    report = measure(comps, ToyJudge(), n=16, batch=16, scheduler="flow_euler", steps=15)["kinds"]
    for kind in ("indirect", "synonym", "explicit"):
        assert report[kind]["share_harmful"] >= 0.75, (kind, report[kind])
    assert report["benign"]["share_harmful"] <= 2 / 16
    assert all(r["colour_agreement"] >= 0.85 for r in report.values()), report


def test_everything_the_repository_ships_as_weights_stays_within_budget():
    """Both toy models with their tokenizers, the judge, and both models' DUO checkpoints and ``C*``."""
    toy = ROOT / "unlearn_exp" / "toy"
    folders = [toy / "weights", *sorted(p for p in toy.glob("artifacts*") if p.is_dir())]
    total = sum(f.stat().st_size for d in folders for f in d.rglob("*") if f.is_file())
    assert total <= SHIPPED_WEIGHTS_BUDGET, total


# ----------------------------------------------------------------------------- DUO and the grid
def test_duo_on_the_toy_mmdit_is_the_sd3_recipe_with_the_toys_named_departures():
    from unlearn_exp.config import preset

    sd3, toy = dict(preset("checkpoint", "duo_sd3")), dict(preset("checkpoint", "duo_toy_mmdit"))
    departures = {"beta_map", "condition", "steps", "train_resolution", "text_length"}
    assert {k for k in sd3 if sd3[k] != toy.get(k)} == departures and set(toy) == set(sd3)
    assert toy["train_resolution"] is None and toy["text_length"] is None  # the toy's own 16 px, 77 tokens
    cfg = compose(["+experiment=toy_mmdit_duo"])
    assert cfg.model.name == "toy_mmdit" and cfg.checkpoint.target_modules == sd3["target_modules"]
    assert cfg.sampling.scheduler == "flow_euler" and cfg.paths.shipped_caches == [
        str(SHIPPED.relative_to(ROOT))
    ]
    toy_duo = compose(["+experiment=toy_duo"])  # the same prompts, judge, PP and sampling as the UNet's grid
    for group in ("task", "benchmark", "judge", "pp"):
        assert cfg[group] == toy_duo[group], group
    assert (cfg.sampling.steps, cfg.sampling.guidance_scale) == (
        toy_duo.sampling.steps,
        toy_duo.sampling.guidance_scale,
    )


def test_the_calibration_ladder_runs_on_the_original_toy_mmdit():
    from unlearn_exp.toy import calibrate

    for _, _, over in calibrate.ladder_cells(model="toy_mmdit")[:2]:
        cfg = compose(over)
        assert cfg.model.name == "toy_mmdit" and cfg.checkpoint.method == "original"


def test_safree_on_the_toy_mmdit_projects_in_each_clip_encoder_and_refuses_official_without_t5():
    from unlearn_exp.errors import UserError
    from unlearn_exp.guidance import SAFREE
    from unlearn_exp.guidance.config import SAFREEConfig
    from unlearn_exp.guidance.safree import sd3_fixed_projection

    comps = build_toy_mmdit(seed=0).freeze()
    prompt = "a purple circle"
    text_e = comps.condition_prompts([prompt]).sequence[0]
    safe, changed = sd3_fixed_projection(comps, prompt, text_e, ["purple", "violet"], alpha=0.01)
    assert safe.shape == text_e.shape and all(p < 77 for p in changed)
    settings = SAFREEConfig.from_cfg(compose(["+experiment=toy_mmdit_duo", "guidance=safree"]).guidance)
    assert settings.compat == "fixed"
    tokens = comps.tokenize([prompt])
    state = SAFREE(["purple"], "purple", settings).prepare(comps, [prompt], tokens, None, 6.0, 5)
    assert state.meta[0]["safree_compat_differs"] is None  # the official mode cannot run here
    official = SAFREEConfig.from_cfg(
        compose(["+experiment=toy_mmdit_duo", "guidance=safree", "guidance.compat=official"]).guidance
    )
    with pytest.raises(UserError, match="T5"):
        SAFREE(["purple"], "purple", official).prepare(comps, [prompt], tokens, None, 6.0, 5)


@pytest.mark.slow
def test_the_demo_runs_the_toy_mmdit_grid_end_to_end(tmp_path, monkeypatch, capsys):
    """``python -m unlearn_exp.demo --model toy_mmdit`` on two cells and one beta's precondition (the
    shipped checkpoint and ``C*`` of beta 2000, 2 prompts per set): its tables under
    ``reports/toy_mmdit`` and the last line with the transformer rows it sampled."""
    from unlearn_exp import demo

    small = small_demo(monkeypatch, tmp_path, [["guidance=none"], ["guidance=safree"]])
    assert demo.main(["--model", "toy_mmdit", *small]) == 0
    out = capsys.readouterr().out
    assert "(toy_mmdit_duo)" in out
    reports = tmp_path / "reports" / "toy_mmdit"
    assert (reports / "precondition.md").is_file() and (reports / "long_toy.md").is_file()
    last = out.strip().splitlines()[-1]
    assert last.startswith("2 cells in") and "transformer rows sampled" in last and "UNet" not in last
