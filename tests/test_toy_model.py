"""The toy model: the recipe lowers the loss, the checkpoint format, the shipped checkpoint's behaviour."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from unlearn_exp.errors import UserError
from unlearn_exp.models import load_model, load_pretrained
from unlearn_exp.models.tokenizer import build_clip_tokenizer
from unlearn_exp.toy.model import build_toy, n_params
from unlearn_exp.toy.pretrain import (
    PretrainConfig,
    ToyPretraining,
    WorldStream,
    _collate,
    pretrain,
    write_compact_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "unlearn_exp" / "toy" / "weights" / "model"
# Floor for the share of explicit-prompt generations the toy judge finds purple. Measured on the
# shipped checkpoint (RECIPE.md): see MEASURED_EXPLICIT; the floor leaves room for platform noise.
EXPLICIT_FLOOR = 0.75


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: on a shared 2-core machine two threads contend and run several times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_toy_architecture_is_sd_shaped_and_small():
    comps = build_toy(seed=0)
    assert comps.vae is None and comps.latent_shape() == (3, 16, 16)
    assert type(comps.unet).__name__ == "UNet2DConditionModel"
    assert type(comps.text_encoder).__name__ == "CLIPTextModel"
    assert comps.scheduler_config["beta_schedule"] == "scaled_linear"
    assert sum(n_params(comps).values()) * 2 < 8e6  # fp16 bytes, leaving room for the tokenizer
    again = build_toy(seed=0)
    assert torch.equal(comps.unet.conv_in.weight, again.unet.conv_in.weight)


@pytest.mark.slow
def test_a_few_pretraining_steps_lower_the_loss():
    torch.manual_seed(0)
    cfg = PretrainConfig(steps=15, batch_size=8, warmup_steps=3, caption_dropout=0.0)
    comps = build_toy(seed=0)
    module = ToyPretraining(comps, cfg)
    images, texts = _collate([WorldStream(99, 8)[i] for i in range(8)])

    def fixed_loss() -> float:
        module._gen = torch.Generator().manual_seed(123)  # same noise and timesteps each time
        with torch.no_grad():
            return float(module.loss(images, texts))

    before = fixed_loss()
    opt = module.configure_optimizers()["optimizer"]
    stream = WorldStream(0, cfg.steps * cfg.batch_size)
    for step in range(cfg.steps):
        batch = _collate([stream[step * cfg.batch_size + i] for i in range(cfg.batch_size)])
        loss = module.loss(*batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fixed_loss()
    assert after < 0.75 * before, (before, after)  # v2 (16 px, offset noise 0.2): 0.67


def test_compact_tokenizer_matches_the_clip_tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    folder = write_compact_tokenizer(tmp_path / "tokenizer")
    tok, ref = CLIPTokenizer.from_pretrained(folder), build_clip_tokenizer()
    for text in ["a purple circle coloured like a grape, flat icon", "mauve; Lilac!! 123 café", ""]:
        assert tok(text).input_ids == ref(text).input_ids
    assert tok.model_max_length == 77 and tok.pad_token_id == ref.pad_token_id


@pytest.mark.slow
def test_pretrain_writes_a_loadable_checkpoint(tmp_path):
    cfg = PretrainConfig(steps=2, batch_size=4, log_every=1)
    out = pretrain(cfg, tmp_path / "toy")
    assert json.loads((out / "recipe.json").read_text())["steps"] == 2
    assert (out / "train_log.csv").read_text().startswith("step,loss,lr,elapsed_s")
    assert not (out / "vae").exists() and not (out / "tokenizer" / "tokenizer.json").exists()
    comps = load_pretrained(str(out), name="toy", resolution=16, vae=False)
    assert comps.vae is None and comps.unet.config.in_channels == 3
    from safetensors.torch import load_file

    for f in out.rglob("*.safetensors"):
        assert {t.dtype for t in load_file(f).values() if t.is_floating_point()} == {torch.float16}
    with pytest.raises(UserError, match="must be positive"):
        pretrain(PretrainConfig(steps=0), tmp_path / "bad")


# ----------------------------------------------------------------------------- the shipped checkpoint
def _shipped():
    if not (WEIGHTS / "unet").is_dir():
        pytest.fail(f"the shipped toy checkpoint is missing at {WEIGHTS}")
    return OmegaConf.load(ROOT / "conf" / "model" / "toy.yaml")


def test_shipped_checkpoint_is_small_and_documented():
    _shipped()
    size = sum(f.stat().st_size for f in WEIGHTS.rglob("*") if f.is_file())
    assert size <= 10 * 1024 * 1024, size
    assert not any(WEIGHTS.rglob("*.bin")) and not any(WEIGHTS.rglob("*.pt"))
    recipe = json.loads((WEIGHTS / "recipe.json").read_text())
    ignore = ("snapshot_every", "log_every", "model")  # bookkeeping (the UNet's recipe predates `model`)
    expected = {k: v for k, v in asdict(PretrainConfig()).items() if k not in ignore}
    assert {k: v for k, v in recipe.items() if k not in ignore} == expected
    log = (WEIGHTS / "train_log.csv").read_text().splitlines()
    first, last = float(log[1].split(",")[1]), float(log[-1].split(",")[1])
    assert last < first / 3


@pytest.mark.parametrize("cwd", ["root", "elsewhere"])
def test_shipped_checkpoint_loads_through_the_config(monkeypatch, tmp_path, cwd):
    cfg = _shipped()
    monkeypatch.chdir(ROOT if cwd == "root" else tmp_path)
    comps = load_model(cfg)
    assert comps.name == "toy" and comps.vae is None and comps.dtype == torch.float32
    assert comps.resolution == 16 and comps.latent_shape() == (3, 16, 16)


@pytest.mark.slow
def test_shipped_checkpoint_draws_what_explicit_prompts_ask():
    from unlearn_exp.sampling import sample
    from unlearn_exp.toy.judge import ToyJudge
    from unlearn_exp.toy.prompts import toy_prompts

    cfg = _shipped()
    comps = load_model(OmegaConf.merge(cfg, {"path": str(WEIGHTS), "device": "cpu"}))
    df = toy_prompts("explicit", n=16, seed=0, with_intent=True)
    out = sample(comps, list(df.prompt), list(df.seed), scheduler="dpmsolver++", steps=20, guidance_scale=6.0)
    verdicts = ToyJudge().judge(out.pil)
    share = sum(not v["safe"] for v in verdicts) / len(verdicts)
    assert share >= EXPLICIT_FLOOR, share
    # and benign prompts are not purple
    df = toy_prompts("benign", n=16, seed=0)
    out = sample(comps, list(df.prompt), list(df.seed), scheduler="dpmsolver++", steps=20, guidance_scale=6.0)
    assert sum(not v["safe"] for v in ToyJudge().judge(out.pil)) <= 2


@pytest.mark.slow
def test_toy_model_loads_through_from_pretrained_as_a_pixel_pipeline(tmp_path):
    """The shipped folder has a model_index.json: diffusers' loader builds the pixel-space pipeline,
    whose images equal our sampler's; Components.to_diffusers() wraps the toy the same way, and a
    saved pipeline loads back."""
    from unlearn_exp.models import load_pretrained
    from unlearn_exp.models.pixel_pipeline import PixelDiffusionPipeline
    from unlearn_exp.sampling import sample
    from unlearn_exp.toy.pretrain import WEIGHTS_DIR

    pipe = PixelDiffusionPipeline.from_pretrained(str(WEIGHTS_DIR))
    comps = load_pretrained(str(WEIGHTS_DIR), name="toy", resolution=16, vae=False)
    prompts, seeds = ["a purple circle", "a grape"], [0, 1]
    ours = sample(comps, prompts, seeds, scheduler="pndm", steps=5, guidance_scale=6.0).images
    torch.testing.assert_close(
        pipe(prompts, num_inference_steps=5, guidance_scale=6.0, seeds=seeds).tensors, ours
    )
    wrapped = comps.to_diffusers()
    ours_dpm = sample(comps, prompts, seeds, steps=5, guidance_scale=6.0).images
    torch.testing.assert_close(
        wrapped(prompts, num_inference_steps=5, guidance_scale=6.0, seeds=seeds).tensors, ours_dpm
    )
    wrapped.save_pretrained(str(tmp_path / "pipe"))
    again = PixelDiffusionPipeline.from_pretrained(str(tmp_path / "pipe"))
    torch.testing.assert_close(
        again(prompts, num_inference_steps=5, guidance_scale=6.0, seeds=seeds).tensors, ours_dpm
    )
    assert len(again(prompts, num_inference_steps=2, seeds=seeds).images) == 2
