"""The guided sampler: one denoising loop for every guidance method, at every scale.

``sample`` is the loop (docs/methods.md 7.5); ``GuidedSampler`` wraps it as a LightningModule whose
``predict_step`` runs a batch of benchmark rows, so ``Trainer.predict`` brings progress bars,
precision and several devices (prompts sharded). Each image's initial noise comes from its own
``torch.Generator().manual_seed(seed)``, so an image does not depend on the batch it is in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image

from unlearn_exp.errors import UserError
from unlearn_exp.guidance.base import CFG, Guidance
from unlearn_exp.identity import resolved_precision
from unlearn_exp.models.components import Components
from unlearn_exp.progress import lightning_bar
from unlearn_exp.quiet import quiet_lightning
from unlearn_exp.runtime import keep_freed_memory


@dataclass
class SampleOutput:
    images: torch.Tensor  # (B, 3, H, W) in [-1, 1], float32 on CPU
    latents: torch.Tensor
    meta: list[dict[str, Any]] = field(default_factory=list)

    @property
    def pil(self) -> list[Image.Image]:
        return to_pil(self.images)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = (
        ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    )
    return [Image.fromarray(a) for a in arr]


def from_pil(images: list[Image.Image], size: int | None = None) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) in [-1, 1] (converted to RGB, resized to ``size`` if given)."""
    out = []
    for im in images:
        im = im.convert("RGB")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(out)


def initial_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One CPU generator per image: the same seed gives the same noise in any batch."""
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    )


UNET_ROWS = 0  # UNet rows (one image, one branch, one step) this process has sampled


def _count_rows(n: int) -> None:
    global UNET_ROWS
    UNET_ROWS += int(n)


@torch.no_grad()
def sample(
    comps: Components,
    prompts: list[str],
    seeds: list[int],
    guidance: Guidance | None = None,
    *,
    scheduler: str = "dpmsolver++",
    steps: int = 50,
    guidance_scale: float = 7.5,
    negative_prompts: list[str] | None = None,
    init_images: torch.Tensor | None = None,
    strength: float = 1.0,
    resolution: int | None = None,
) -> SampleOutput:
    """Sample one image per (prompt, seed); ``init_images`` + ``strength`` < 1 give SDEdit (img2img)."""
    if len(prompts) != len(seeds):
        raise UserError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if not prompts:
        raise UserError("nothing to sample: the prompt list is empty")
    keep_freed_memory()  # once per process: the UNet's activations reuse freed memory (runtime.py)
    guidance = guidance or CFG()
    device, dtype = comps.device, comps.dtype
    sched = comps.sampling_scheduler(scheduler)
    shape = comps.latent_shape(resolution)
    comps.set_timesteps(sched, steps, shape)
    timesteps = sched.timesteps

    noise = initial_noise(seeds, shape).to(device=device, dtype=dtype)
    if init_images is None:
        latents = comps.start_latents(sched, noise)
    else:
        if not 0.0 < strength <= 1.0:
            raise UserError(f"img2img strength must be in (0, 1], got {strength}")
        init = comps.image_latents(init_images)  # the VAE posterior mean; the identity path the pixels
        start = comps.img2img_start(steps, strength) * getattr(sched, "order", 1)
        timesteps = timesteps[start:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start)
        latents = comps.noise_to(sched, init, noise, timesteps[:1].repeat(len(prompts)))

    tokens = comps.tokenize(prompts)
    state = guidance.prepare(comps, prompts, tokens, negative_prompts, guidance_scale, len(timesteps))
    state.branches = [b.to(dtype) for b in state.branches]
    n = state.n_branches
    for i, t in enumerate(timesteps):
        cond = guidance.embeddings(i, state)
        model_in = comps.model_input(sched, torch.cat([latents] * n), t)
        with guidance.unet_hooks(i, state, comps.denoiser):
            pred = comps.denoise(model_in, t, cond)
        _count_rows(model_in.shape[0])
        pred_hat = guidance.combine(i, list(pred.chunk(n)), state)
        latents = sched.step(pred_hat, t, latents).prev_sample
        if not torch.isfinite(latents).all():  # not latents.sum(): in float16 a finite sum overflows
            bad = [p[:40] for p, ok in zip(prompts, torch.isfinite(latents).flatten(1).all(1)) if not ok]
            advice = (
                "check the model weights and the precision (model.dtype, sampling.precision)"
                if guidance.name == "none"
                else "lower the guidance strength, or check the model weights and the precision"
            )
            raise UserError(
                f"non-finite latents at sampling step {i} (t={int(t)}) with guidance '{guidance.name}' "
                f"for prompt(s) {bad}: {advice}"
            )
    images = comps.decode_latents(latents).float().cpu()
    meta = []
    for b in range(len(prompts)):
        m = {"truncated": tokens.truncated[b], "n_tokens": tokens.n_tokens[b], "guidance": guidance.name}
        if b < len(state.meta):
            m.update(state.meta[b])
        meta.append(m)
    return SampleOutput(images=images, latents=latents.float().cpu(), meta=meta)


class GuidedSampler(L.LightningModule):
    """``predict_step`` samples a batch of rows (dicts with case_id, prompt, seed, image_index)."""

    def __init__(self, comps: Components, guidance: Guidance | None = None, **sample_kwargs):
        super().__init__()
        self.comps = comps
        # registered so Lightning moves them to the device and applies the precision plugin
        self.parts = torch.nn.ModuleDict(comps.modules())
        self.guidance = guidance or CFG()
        self.sample_kwargs = sample_kwargs

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int = 0) -> list[dict[str, Any]]:
        out = sample(
            self.comps,
            [r["prompt"] for r in batch],
            [int(r["seed"]) for r in batch],
            self.guidance,
            **self.sample_kwargs,
        )
        return [
            {**row, **meta, "image": img, "image_tensor": t}
            for row, meta, img, t in zip(batch, out.meta, out.pil, out.images)
        ]


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


def _keep_list(batch):
    return batch


def apply_gpu_options(comps: Components, sampling_cfg) -> None:
    """``sampling.compile``, ``channels_last``, ``tf32``, ``vae_slicing``, ``vae_tiling`` (all off by
    default; ``make gpu-check`` measures each). Diffusers' UNet already uses scaled-dot-product
    attention (``AttnProcessor2_0``) where torch provides it."""
    s = sampling_cfg  # every key present: conf/sampling/default.yaml (schema.py)
    if s["tf32"] and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if s["channels_last"]:
        comps.denoiser.to(memory_format=torch.channels_last)
    if comps.vae is not None and s["vae_slicing"]:
        comps.vae.enable_slicing()
    if comps.vae is not None and s["vae_tiling"]:
        comps.vae.enable_tiling()
    if s["compile"] and not getattr(comps.denoiser, "_compiled_by_unlearn_exp", False):
        compiled = torch.compile(comps.denoiser)
        compiled._compiled_by_unlearn_exp = True
        comps.denoiser = compiled


def predict_rows(
    comps: Components,
    guidance: Guidance | None,
    rows: list[dict[str, Any]],
    *,
    batch_size: int = 4,
    devices: int | str = 1,
    precision: str = "auto",
    progress: bool = True,
    label: str | None = None,
    **sample_kwargs,
) -> list[dict[str, Any]]:
    """Run ``GuidedSampler`` over ``rows`` with ``Trainer.predict``; returns rows with images, in order.
    ``label`` names what is sampled in the progress bar ("sampling i2p_nudity x sld+C* ...")."""
    from unlearn_exp.training import StopOnSigterm, keeps_device

    precision = resolved_precision(precision)
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    quiet_lightning()
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices if accelerator == "gpu" else 1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[StopOnSigterm()]
        + (
            [lightning_bar(label or f"sampling ({getattr(guidance, 'name', 'none')})", len(rows), "img")]
            if progress
            else []
        ),
    )
    loader = torch.utils.data.DataLoader(
        _Rows(rows), batch_size=batch_size, shuffle=False, collate_fn=_keep_list
    )
    with keeps_device(comps):  # Lightning moves its module (and the shared model) to the CPU at the end
        batches = trainer.predict(GuidedSampler(comps, guidance, **sample_kwargs), loader)
    return [r for b in batches for r in b]
