"""Pretraining a toy model on the toy world: ``python -m unlearn_exp.toy.pretrain [--model toy_mmdit]``.

A LightningModule trains the denoiser and the text encoder(s) jointly on rendered (image, caption)
pairs streamed deterministically from a seed (``world.render_example``), with offset noise. Captions
are replaced by the empty prompt with probability ``caption_dropout`` so classifier-free guidance
works. The weights saved are an exponential moving average of the trained ones. The objective is
the family's own:

- ``toy`` (the UNet, SD v1 family): Stable Diffusion's epsilon-prediction loss,
  ``|| eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, c) ||^2``, t uniform over the 1000
  DDPM steps of SD v1.4's scaled-linear schedule;
- ``toy_mmdit`` (the MMDiT, SD3 family): the rectified-flow velocity loss SD3 was pretrained with,
  ``|| (eps - x0) - v_theta((1 - sigma) x0 + sigma eps, 1000 sigma, c) ||^2``, sigma drawn
  logit-normal (``sigmoid(N(0, 1))``, SD3 paper's rf/lognorm(0, 1)).

The shipped checkpoints ``unlearn_exp/toy/weights/model`` and ``.../mmdit`` were made by ``make
toy-pretrain`` (and ``MODEL=toy_mmdit``), i.e. this module with the recipe ``RECIPES[model]`` (in
``RECIPE.md``, log in ``train_log.csv``).
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from unlearn_exp.atomic import atomic_dir
from unlearn_exp.errors import UserError
from unlearn_exp.models.components import Components
from unlearn_exp.quiet import quiet_lightning
from unlearn_exp.toy.model import build_toy
from unlearn_exp.toy.world import example_seed, render_example, to_tensor_batch

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "model"
PIXEL_PIPELINE_INDEX = {
    "_class_name": "PixelDiffusionPipeline",
    "_diffusers_version": "0.42.1",
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
}


@dataclass
class PretrainConfig:
    model: str = "toy"  # toy (the UNet) | toy_mmdit (the MMDiT)
    seed: int = 0
    steps: int = 2400
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    weight_decay: float = 0.01
    caption_dropout: float = 0.1
    offset_noise: float = (
        0.2  # per-image, per-channel constant added to the noise (v1 at 32 px: 0.1; see loss)
    )
    ema_decay: float = 0.998
    grad_clip: float = 1.0
    p_object: float = 0.3  # share of scenes depicting an object (the indirect vocabulary)
    threads: int = 2
    log_every: int = 100
    snapshot_every: int = 0  # also save a snapshot every N steps (0: only at the end)


# each toy model's recipe: the UNet's as shipped since world v2; the MMDiT's is the same but for its
# steps (a transformer of 0.59M parameters learns the world more slowly than the UNet; RECIPE.md)
RECIPES = {
    "toy": PretrainConfig(),
    "toy_mmdit": PretrainConfig(model="toy_mmdit", steps=4000),
}
WEIGHTS_DIRS = {"toy": WEIGHTS_DIR, "toy_mmdit": WEIGHTS_DIR.parent / "mmdit"}


def build_model(name: str, seed: int):
    """A fresh toy model by name (``toy``: the UNet, ``toy_mmdit``: the MMDiT)."""
    if name == "toy_mmdit":
        from unlearn_exp.toy.mmdit import build_toy_mmdit

        return build_toy_mmdit(seed=seed)
    if name != "toy":
        raise UserError(f"unknown toy model '{name}': choose toy or toy_mmdit")
    return build_toy(seed=seed)


class WorldStream(torch.utils.data.Dataset):
    """Example ``i`` is ``render_example(example_seed(seed, i))``: a fixed, reproducible stream."""

    def __init__(self, seed: int, length: int, p_object: float = 0.3):
        self.seed, self.length, self.p_object = seed, length, p_object

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        img, text, scene = render_example(example_seed(self.seed, i), self.p_object)
        return img, text


def _collate(batch):
    images, texts = zip(*batch)
    return to_tensor_batch(list(images)), list(texts)


class ToyPretraining(L.LightningModule):
    """Joint denoiser + text-encoder training with caption dropout and an EMA copy of the weights."""

    def __init__(self, comps: Components, cfg: PretrainConfig):
        super().__init__()
        self.comps, self.cfg = comps, cfg
        self.trained = torch.nn.ModuleDict(comps.modules())
        self.trained.requires_grad_(True).train()
        self.flow = comps.prediction == "flow"
        if not self.flow:
            self.noise_scheduler = comps.training_scheduler()
            self.register_buffer(
                "alphas_cumprod", self.noise_scheduler.alphas_cumprod.clone().float(), persistent=False
            )
        self.ema = {k: copy.deepcopy(m).requires_grad_(False).eval() for k, m in comps.modules().items()}
        self._gen = torch.Generator().manual_seed(cfg.seed)
        self.log_rows: list[dict] = []
        self._t0 = time.time()
        self._acc: list[float] = []

    def loss(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        b = images.shape[0]
        drop = torch.rand(b, generator=self._gen) < self.cfg.caption_dropout
        texts = ["" if d else t for d, t in zip(drop.tolist(), texts)]
        cond = self.comps.condition(self.comps.tokenize(texts))
        noise = torch.randn(images.shape, generator=self._gen)
        if self.cfg.offset_noise:
            # offset noise: a per-channel constant hides the image's mean colour at high t, which
            # SD's schedule (sqrt(abar_T) = 0.068) otherwise leaves readable on the toy's pixels; without
            # it the model took colours from the initial noise instead of the prompt (RECIPE.md). The
            # noise's mean over 16x16 pixels varies twice as much as over 32x32, hence 0.2 (v1: 0.1)
            noise = noise + self.cfg.offset_noise * torch.randn(b, images.shape[1], 1, 1, generator=self._gen)
        noise = noise.to(images)
        if self.flow:  # rectified flow, sigma logit-normal (SD3's pretraining)
            sigma = torch.sigmoid(torch.randn(b, generator=self._gen)).to(images)
            s = sigma.view(b, 1, 1, 1)
            noisy, target, t = (1 - s) * images + s * noise, noise - images, sigma * 1000
        else:
            t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=self._gen)
            t = t.to(images.device)
            abar = self.alphas_cumprod.to(images.device)[t].view(b, 1, 1, 1)
            noisy, target = abar.sqrt() * images + (1 - abar).sqrt() * noise, noise
        pred = self.comps.denoise(noisy, t, cond)
        return F.mse_loss(pred.float(), target.float())

    def training_step(self, batch, batch_idx):
        images, texts = batch
        loss = self.loss(images, texts)
        self._acc.append(float(loss.detach()))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        step = self.global_step
        decay = min(self.cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, m in self.comps.modules().items():
                for pe, p in zip(self.ema[k].parameters(), m.parameters()):
                    pe.mul_(decay).add_(p.detach(), alpha=1 - decay)
        if step % self.cfg.log_every == 0 or step == self.cfg.steps:
            row = {
                "step": step,
                "loss": sum(self._acc) / max(len(self._acc), 1),
                "lr": self.trainer.optimizers[0].param_groups[0]["lr"],
                "elapsed_s": round(time.time() - self._t0, 1),
            }
            self._acc = []
            self.log_rows.append(row)
            print(json.dumps(row), flush=True)
        if self.cfg.snapshot_every and step % self.cfg.snapshot_every == 0 and step < self.cfg.steps:
            out = getattr(self, "snapshot_dir", None)
            if out is not None:
                write_checkpoint(self.ema_components(), Path(out) / f"step{step}")

    def configure_optimizers(self):
        params = list(self.trained.parameters())
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        cfg = self.cfg

        def schedule(step: int) -> float:
            if step < cfg.warmup_steps:
                return (step + 1) / cfg.warmup_steps
            frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def ema_components(self) -> Components:
        c = copy.copy(self.comps)
        for name, module in self.ema.items():
            setattr(c, name, module)
        return c


def save_components(comps: Components, path: Path, dtype=torch.float16) -> Path:
    from unlearn_exp.models import save_components as _save

    return _save(comps, path, dtype=dtype)


def pretrain(cfg: PretrainConfig, out: str | Path, snapshot_dir: str | Path | None = None) -> Path:
    """Train the toy model from scratch and write it to ``out`` (fp16 safetensors, recipe, log)."""
    if cfg.steps <= 0 or cfg.batch_size <= 0:
        raise UserError(f"steps and batch_size must be positive, got {cfg.steps} and {cfg.batch_size}")
    torch.set_num_threads(max(1, cfg.threads))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    quiet_lightning()
    comps = build_model(cfg.model, cfg.seed)
    module = ToyPretraining(comps, cfg)
    module.snapshot_dir = snapshot_dir
    loader = torch.utils.data.DataLoader(
        WorldStream(cfg.seed, cfg.steps * cfg.batch_size, cfg.p_object),
        batch_size=cfg.batch_size,
        shuffle=False,
        collate_fn=_collate,
        num_workers=0,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=cfg.steps,
        gradient_clip_val=cfg.grad_clip,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(module, loader)
    final = module.ema_components().freeze()
    final.name = cfg.model
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["step", "loss", "lr", "elapsed_s"])
    writer.writeheader()
    writer.writerows(module.log_rows)
    return write_checkpoint(final, out, recipe=asdict(cfg), log_csv=buf.getvalue())


def write_checkpoint(
    comps: Components, out: str | Path, recipe: dict | None = None, log_csv: str | None = None
) -> Path:
    """One atomic folder: fp16 diffusers layout, compact tokenizer, ``recipe.json``, ``train_log.csv``."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        save_components(comps, tmp / "_components", dtype=torch.float16)
        for child in (tmp / "_components").iterdir():
            os.replace(child, tmp / child.name)
        (tmp / "_components").rmdir()
        for sub, tokenizer in comps.tokenizers().items():
            shutil.rmtree(tmp / sub)
            write_compact_tokenizer(tmp / sub, pad_token=str(tokenizer.pad_token))
        # diffusers' from_pretrained builds the pixel-space pipeline from this index
        # (unlearn_exp/models/pixel_pipeline.py)
        index = PIXEL_PIPELINE_INDEX if comps.family == "sd1" else comps.model_index()
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        if recipe is not None:
            (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
        if log_csv is not None:
            (tmp / "train_log.csv").write_text(log_csv)
    return out


def write_compact_tokenizer(folder: str | Path, pad_token: str = "<|endoftext|>") -> Path:
    """The CLIP tokenizer as ``vocab.json`` + ``merges.txt`` (1.4 MB) instead of ``tokenizer.json`` (3.6 MB).

    ``CLIPTokenizer.from_pretrained`` reads it back with the same ids (tested); this keeps the
    shipped checkpoint under 10 MB. ``pad_token``: SD3's second CLIP tokenizer pads with "!".
    """
    from unlearn_exp.models.tokenizer import MAX_LENGTH, vocab_and_merges

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocab_and_merges()
    (folder / "vocab.json").write_text(
        json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8"
    )
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    special = "<|endoftext|>"
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": "<|startoftext|>",
        "eos_token": special,
        "pad_token": pad_token,
        "unk_token": special,
        "model_max_length": MAX_LENGTH,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="output folder (default: the model's shipped weights)")
    ap.add_argument("--snapshot-dir", default=None)
    for f in fields(PretrainConfig):  # default: the recipe of --model
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None)
    args = ap.parse_args(argv)
    model = args.model or "toy"
    if model not in RECIPES:
        raise SystemExit(f"error: unknown toy model '{model}': choose one of {sorted(RECIPES)}")
    given = {f.name: getattr(args, f.name) for f in fields(PretrainConfig)}
    given = {k: v for k, v in given.items() if v is not None}
    cfg = PretrainConfig(**{**asdict(RECIPES[model]), **given})
    path = pretrain(cfg, args.out or WEIGHTS_DIRS[model], args.snapshot_dir)
    print(f"toy model written to {path}")


if __name__ == "__main__":
    main()
