"""Seconds per concept-inversion step: the Lightning module vs a minimal hand-written PyTorch loop.

Both run the same step (``ConceptInversion.step_loss`` + AdamW on the placeholder rows) on the
tiny model on CPU; the Lightning wrapper's overhead should stay under 10% (issue item 6).

    python -m unlearn_exp.bench.inversion --steps 60 --resolution 32 --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import lightning as L
import torch

from unlearn_exp.config import preset
from unlearn_exp.inversion.concept_inversion import ConceptInversion
from unlearn_exp.inversion.textual_inversion import add_placeholder_tokens
from unlearn_exp.models import build_tiny
from unlearn_exp.runtime import keep_freed_memory


def _module(resolution: int, batch_size: int, steps: int) -> ConceptInversion:
    comps = build_tiny(resolution=resolution)
    tokens = add_placeholder_tokens(comps, "<c*>", 1, "dog")
    images = torch.rand(8, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cfg = preset("inversion", "default", init_word="dog", batch_size=batch_size, steps=steps, lr=5e-3)
    return ConceptInversion(comps, tokens, images, cfg)


class _Timer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.steps = warmup, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.elapsed = time.perf_counter() - self.start
        self.steps = trainer.global_step - self.warmup


def lightning_seconds_per_step(resolution: int, batch_size: int, steps: int, warmup: int) -> float:
    module = _module(resolution, batch_size, steps + warmup)
    timer = _Timer(warmup)
    trainer = L.Trainer(
        max_steps=steps + warmup,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=True,
        enable_model_summary=False,
        callbacks=[timer],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)
    return timer.elapsed / timer.steps


def plain_seconds_per_step(resolution: int, batch_size: int, steps: int, warmup: int) -> float:
    module = _module(resolution, batch_size, steps + warmup)
    opt = module.configure_optimizers()
    start = None
    for step in range(steps + warmup):
        if step == warmup:
            start = time.perf_counter()
        loss = module.step_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        float(loss.detach())  # the Lightning module reads the loss each step too (NaN check)
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="alternating runs; the best of each is kept")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    keep_freed_memory()  # as the trainers do, for both loops (runtime.py)
    plain, light = [], []
    for _ in range(a.repeats):  # alternate so that load changes hit both sides alike
        plain.append(plain_seconds_per_step(a.resolution, a.batch_size, a.steps, a.warmup))
        light.append(lightning_seconds_per_step(a.resolution, a.batch_size, a.steps, a.warmup))
    result = {
        "model": "tiny",
        "resolution": a.resolution,
        "batch_size": a.batch_size,
        "steps": a.steps,
        "plain_s_per_step": min(plain),
        "lightning_s_per_step": min(light),
        "overhead": min(light) / min(plain) - 1,
    }
    result["under_10_percent"] = result["overhead"] < 0.10
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
