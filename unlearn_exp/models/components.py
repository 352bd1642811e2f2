"""The model components every stage works with, at every scale (sd14, toy, tiny).

``Components`` holds the diffusers/transformers modules of a Stable-Diffusion-shaped model and
the few operations the stages share: tokenising, text encoding (sequence and pooled), mapping
images to latents and back, and building schedulers from the checkpoint's noise schedule.
A model without a VAE (the toy) uses the identity latent path: latents are the images in [-1, 1].
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTokenizer

from unlearn_exp.errors import UserError


class _SpuriousFp32Warning(logging.Filter):
    """Drops diffusers' "There are modules in X that should be kept in float32: []" warning, and only
    where the list is empty.

    ``ModelMixin.to`` (diffusers 0.42) takes ``fp32_modules = self._keep_in_fp32_modules or []`` and
    then warns when ``fp32_modules is not None``, which always holds: every cast with a dtype (ours in
    ``Components.to``, Lightning's precision plugins) warned, even for the UNet and VAE of Stable
    Diffusion, whose list of modules to keep in float32 is empty, so there is nothing the cast could
    make inconsistent. A model that does list modules still gets the warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("There are modules in ") and "should be kept in float32: []." in msg)


_FP32_FILTER = _SpuriousFp32Warning()
logging.getLogger("diffusers.models.modeling_utils").addFilter(_FP32_FILTER)  # the logger that warns

SAMPLERS = {
    "dpmsolver++": DPMSolverMultistepScheduler,
    "pndm": PNDMScheduler,
    "ddim": DDIMScheduler,
}


@dataclass
class TokenizedPrompts:
    """Token ids padded to the model length, and which prompts were cut at 77 tokens."""

    input_ids: torch.Tensor  # (B, 77) long
    attention_mask: torch.Tensor  # (B, 77) long, 1 on BOS, words and the first EOS
    truncated: list[bool]
    n_tokens: list[int]  # tokens before truncation, BOS and EOS included


@dataclass
class Components:
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict[str, Any]
    vae: AutoencoderKL | None = None
    resolution: int = 512
    name: str = "model"
    source: str = ""  # path or hub id it was loaded from, or "built in memory"
    identity: str = ""  # by content (identity.model_identity); set by load_model
    extra: dict[str, Any] = field(default_factory=dict)

    def key(self) -> dict[str, str]:
        """What names this model in a cache key: its content identity and the dtype it runs in."""
        return {"id": self.identity or f"{self.name}:{self.source}", "dtype": str(self.dtype)}

    # ----------------------------------------------------------------- geometry
    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor) if self.vae is not None else 1.0

    @property
    def vae_factor(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        res = resolution or self.resolution
        if res % self.vae_factor:
            raise UserError(f"resolution {res} is not a multiple of the VAE factor {self.vae_factor}")
        side = res // self.vae_factor
        return (self.unet.config.in_channels, side, side)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def text_dim(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    def to(self, device=None, dtype=None) -> Components:
        # only the arguments given: diffusers' ModelMixin.to tests ``"dtype" in kwargs``, so a device
        # move written ``to(device=d, dtype=None)`` counted as a cast and logged the float32 warning
        # (see _SpuriousFp32Warning)
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        if kwargs:
            for m in self.modules().values():
                m.to(**kwargs)
        return self

    def modules(self) -> dict[str, torch.nn.Module]:
        out = {"unet": self.unet, "text_encoder": self.text_encoder}
        if self.vae is not None:
            out["vae"] = self.vae
        return out

    @contextmanager
    def in_float32(self, *names: str) -> Iterator[None]:
        """The named modules (``"vae"``, ``"text_encoder"``) in float32 for the block where they are in
        half precision, then back in the dtype they had; others, and float32 ones, are left as they are.
        The round trip is exact: every float16 and bfloat16 value is a float32 (docs/methods.md 13)."""
        mods = self.modules()
        changed = []
        for name in names:
            m = mods.get(name)
            if m is None:
                continue
            dtype = next(m.parameters()).dtype
            if dtype in (torch.float16, torch.bfloat16):
                changed.append((m, dtype))
        try:
            for m, _ in changed:
                m.to(dtype=torch.float32)
            yield
        finally:
            for m, dtype in changed:
                m.to(dtype=dtype)

    def freeze(self) -> Components:
        for m in self.modules().values():
            m.requires_grad_(False)
            m.eval()
        return self

    # ------------------------------------------------------------------- text
    def tokenize(self, prompts: list[str]) -> TokenizedPrompts:
        """Pad to 77 with max-length padding and truncation, as Stable Diffusion does."""
        max_len = self.tokenizer.model_max_length
        full = self.tokenizer(list(prompts), padding=False, truncation=False, verbose=False).input_ids
        enc = self.tokenizer(
            list(prompts), padding="max_length", max_length=max_len, truncation=True, return_tensors="pt"
        )
        n_tokens = [len(ids) for ids in full]
        return TokenizedPrompts(
            input_ids=enc.input_ids.to(self.device),
            attention_mask=enc.attention_mask.to(self.device),
            truncated=[n > max_len for n in n_tokens],
            n_tokens=n_tokens,
        )

    def encode_ids(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text-encoder output: (last hidden state ``(B, 77, D)``, pooled ``(B, D)``).

        The pooled embedding is the last hidden state at the first EOS token (docs/methods.md 2). It is
        taken here rather than from ``pooler_output``: with SD v1.4's legacy config
        (``eos_token_id=2``) transformers pools at ``argmax(ids)``, which picks an added token such
        as ``<c*>`` (id 49408) instead of EOS.
        """
        input_ids = input_ids.to(self.device)
        hidden = self.text_encoder(input_ids).last_hidden_state
        eos = (input_ids == self.tokenizer.eos_token_id).int().argmax(dim=-1)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), eos]
        return hidden, pooled

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_ids(self.tokenize(prompts).input_ids)

    # ---------------------------------------------------------------- latents
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1], ``(B, 3, H, W)`` -> scaled latents (a VAE sample, or the images themselves)."""
        if self.vae is None:
            return images.to(device=self.device, dtype=self.dtype)
        # straight to the VAE's dtype: a float32 VAE sees the pixels unrounded (docs/methods.md 13)
        dist = self.vae.encode(images.to(device=self.device, dtype=self.vae.dtype)).latent_dist
        return dist.sample(generator=generator).to(self.dtype) * self.latent_scale

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1]."""
        if self.vae is None:
            return latents.clamp(-1, 1)
        return self.vae.decode(latents.to(self.vae.dtype) / self.latent_scale).sample.clamp(-1, 1)

    # ------------------------------------------------------------- schedulers
    def training_scheduler(self) -> DDPMScheduler:
        """The checkpoint's DDPM noise schedule (for inversion and unlearning losses)."""
        return DDPMScheduler.from_config(self.scheduler_config)

    def sampling_scheduler(self, name: str = "dpmsolver++"):
        """A fresh sampler with the checkpoint's noise schedule (stateful samplers need one per batch)."""
        if name not in SAMPLERS:
            raise UserError(f"unknown sampler '{name}': choose one of {sorted(SAMPLERS)}")
        cls = SAMPLERS[name]
        if name == "dpmsolver++":
            return cls.from_config(self.scheduler_config, algorithm_type="dpmsolver++", solver_order=2)
        if name == "pndm":
            return cls.from_config(self.scheduler_config, skip_prk_steps=True)
        return cls.from_config(self.scheduler_config)

    # --------------------------------------------------------------- interop
    def to_diffusers(self, scheduler=None, safe: bool = False):
        """A plain diffusers pipeline over the same modules: ``StableDiffusionPipeline`` (or the safe one),
        or, for a model without a VAE, ``PixelDiffusionPipeline`` (``models/pixel_pipeline.py``)."""
        if self.vae is None:
            if safe:
                raise UserError(f"model '{self.name}' has no VAE: diffusers' safe pipeline cannot wrap it")
            from unlearn_exp.models.pixel_pipeline import PixelDiffusionPipeline

            return PixelDiffusionPipeline(
                self.unet, self.text_encoder, self.tokenizer, scheduler or self.sampling_scheduler()
            )
        from diffusers import StableDiffusionPipeline, StableDiffusionPipelineSafe

        cls = StableDiffusionPipelineSafe if safe else StableDiffusionPipeline
        return cls(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=scheduler or self.sampling_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
