"""The toy MMDiT (``model=toy_mmdit``, the SD3 family on the toy world): its architecture, its
pretraining, the shipped checkpoint's behaviour, its DUO checkpoints and ``C*``, and its grid."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


def test_everything_the_repository_ships_as_weights_stays_within_budget():
    """Both toy models with their tokenizers, the judge, and both models' DUO checkpoints and ``C*``."""
    toy = ROOT / "unlearn_exp" / "toy"
    folders = [toy / "weights", *sorted(toy.glob("artifacts*"))]
    total = sum(f.stat().st_size for d in folders for f in d.rglob("*") if f.is_file())
    assert total <= SHIPPED_WEIGHTS_BUDGET, total
