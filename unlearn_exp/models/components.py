"""The model components every stage works with, at every scale (sd14, toy, tiny): the SD v1 family.

``Components`` holds the diffusers/transformers modules of a Stable-Diffusion-v1-shaped model and
the few operations the stages share: tokenising, text encoding (sequence and pooled), mapping
images to latents and back, building schedulers from the checkpoint's noise schedule, and one
denoiser call. A model without a VAE (the toy) uses the identity latent path: latents are the images
in [-1, 1]. ``FamilyComponents`` is what every family provides (docs/model_families.md); the second
family, SD3, is ``models/sd3.py``.
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
    """Token ids padded to the model length, and which prompts were cut at 77 tokens. A family with
    several text encoders keeps the first (CLIP) encoder's ids here and the others' in ``more``."""

    input_ids: torch.Tensor  # (B, 77) long
    attention_mask: torch.Tensor  # (B, 77) long, 1 on BOS, words and the first EOS
    truncated: list[bool]
    n_tokens: list[int]  # tokens before truncation, BOS and EOS included
    more: dict[str, torch.Tensor] = field(default_factory=dict)  # other encoders' ids, by encoder


def clip_tokenize(tokenizer: CLIPTokenizer, prompts: list[str], device) -> TokenizedPrompts:
    """CLIP ids padded to the tokenizer's length (77) with max-length padding and truncation, as
    Stable Diffusion does, and which prompts were cut."""
    max_len = tokenizer.model_max_length
    full = tokenizer(list(prompts), padding=False, truncation=False, verbose=False).input_ids
    enc = tokenizer(
        list(prompts), padding="max_length", max_length=max_len, truncation=True, return_tensors="pt"
    )
    n_tokens = [len(ids) for ids in full]
    return TokenizedPrompts(
        input_ids=enc.input_ids.to(device),
        attention_mask=enc.attention_mask.to(device),
        truncated=[n > max_len for n in n_tokens],
        n_tokens=n_tokens,
    )


@dataclass
class Conditioning:
    """What the denoiser is conditioned on for a batch: the token sequence ``(B, L, D)`` and the pooled
    text vector ``(B, P)``. SD v1's UNet reads the sequence only (77 x 768); SD3's transformer reads
    both (CLIP-L and CLIP-G joined and T5, 77 + 256 tokens of 4096; pooled 2048)."""

    sequence: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.sequence.shape[0])

    def _map(self, fn) -> Conditioning:
        return Conditioning(fn(self.sequence), None if self.pooled is None else fn(self.pooled))

    def to(self, *args, **kwargs) -> Conditioning:
        return self._map(lambda x: x.to(*args, **kwargs))

    def expand(self, n: int) -> Conditioning:
        """A batch of one repeated ``n`` times (a view)."""
        return self._map(lambda x: x.expand(n, *x.shape[1:]))

    def detach(self) -> Conditioning:
        return self._map(lambda x: x.detach())

    def repeat_interleave(self, n: int) -> Conditioning:
        return self._map(lambda x: x.repeat_interleave(n, 0))

    def lerp(self, other: Conditioning, weight: float) -> Conditioning:
        """``self + weight (other - self)`` on every part."""
        seq = self.sequence + weight * (other.sequence - self.sequence)
        pooled = None if self.pooled is None else self.pooled + weight * (other.pooled - self.pooled)
        return Conditioning(seq, pooled)

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        """The batches one after the other (the branches of a guided step, one denoiser call)."""
        pooled = None if items[0].pooled is None else torch.cat([c.pooled for c in items], dim=0)
        return Conditioning(torch.cat([c.sequence for c in items], dim=0), pooled)


class FamilyComponents:
    """What every model family's components provide beyond their modules (SD v1: ``Components``;
    SD3: ``models/sd3.py``). The denoiser is ``denoiser``; ``prediction`` what it predicts
    (``epsilon`` or ``flow``); stages call ``condition``, ``denoise``, the latent and scheduler
    methods, and never branch on the family (docs/model_families.md)."""

    family = "?"
    prediction = "epsilon"
    name: str
    source: str
    identity: str

    @property
    def denoiser(self) -> torch.nn.Module:
        raise NotImplementedError

    def modules(self) -> dict[str, torch.nn.Module]:
        raise NotImplementedError

    def key(self) -> dict[str, str]:
        """What names this model in a cache key: its content identity and the dtype it runs in."""
        return {"id": self.identity or f"{self.name}:{self.source}", "dtype": str(self.dtype)}

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def to(self, device=None, dtype=None):
        # only the arguments given: diffusers' ModelMixin.to tests ``"dtype" in kwargs``, so a device
        # move written ``to(device=d, dtype=None)`` counted as a cast and logged the float32 warning
        # (see _SpuriousFp32Warning)
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        if kwargs:
            for m in self.modules().values():
                m.to(**kwargs)
        return self

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

    def freeze(self):
        for m in self.modules().values():
            m.requires_grad_(False)
            m.eval()
        return self

    def denoise(self, latents: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
        """One denoiser call: the prediction (noise, or SD3's velocity) at timestep(s) ``t``."""
        args, kwargs = self.denoiser_call(latents, t, cond)
        return self.prediction_of(self.denoiser(*args, **kwargs))

    def condition_prompts(self, prompts: list[str], text_length: int | None = None) -> Conditioning:
        """``condition(tokenize(prompts))``; ``text_length``: the length of a family's long text
        encoder where it is not the default (SD3's T5: DUO's script trains with 77, samples with 256;
        SD v1 has one length, 77, and ignores it)."""
        return self.condition(self.tokenize(prompts))

    # the sampler's few family-specific operations (docs/model_families.md)
    def start_latents(self, scheduler, noise: torch.Tensor) -> torch.Tensor:
        """The first latents of a sampling run from unit Gaussian noise."""
        return noise * scheduler.init_noise_sigma

    def set_timesteps(self, scheduler, steps: int, latent_shape: tuple[int, ...]) -> None:
        scheduler.set_timesteps(steps, device=self.device)

    def img2img_start(self, steps: int, strength: float) -> int:
        """The first step an SDEdit run of ``strength`` samples (as diffusers' img2img pipeline)."""
        return steps - min(int(steps * strength), steps)

    def noise_to(
        self, scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Latents noised to timestep ``t`` (one per row), as the scheduler's forward process does."""
        return scheduler.add_noise(latents, noise, t)

    def model_input(self, scheduler, latents: torch.Tensor, t) -> torch.Tensor:
        return scheduler.scale_model_input(latents, t)

    # the training objective (DUO's preference and preservation terms; docs/model_families.md)
    def training_timesteps(self, scheduler, n: int, t_min: int, t_max: int, generator) -> torch.Tensor:
        """``n`` training timesteps from the window ``[t_min, t_max]`` (counts of 1000 train steps)."""
        return torch.randint(t_min - 1, t_max, (n,), generator=generator)

    def timestep_near(self, scheduler, t: int) -> torch.Tensor:
        """The schedule's timestep nearest ``t`` (of 1000; SD v1: ``t`` itself), as a batch of one."""
        return torch.tensor([int(t)])

    def final_timestep(self, scheduler) -> int:
        """The timestep of the output-preservation term: the last, pure noise."""
        return int(scheduler.config.num_train_timesteps) - 1

    def training_input(
        self, scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """The noisy training input at ``t``; for the preservation term (``latents`` None) pure noise."""
        return noise if latents is None else scheduler.add_noise(latents, noise, t)

    def training_pair(
        self, scheduler, pred: torch.Tensor, x_t: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, t
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the loss compares, its target): the prediction and the noise (SD v1), or the velocity
        ``get_velocity(x0, noise, t)`` for a checkpoint that predicts it (``v_prediction``)."""
        if latents is not None and scheduler.config.prediction_type == "v_prediction":
            return pred, scheduler.get_velocity(latents, noise, t)
        return pred, noise


@dataclass
class Components(FamilyComponents):
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

    family = "sd1"
    prediction = "epsilon"  # the UNet predicts the noise

    @property
    def denoiser(self) -> UNet2DConditionModel:
        return self.unet

    @denoiser.setter
    def denoiser(self, module: torch.nn.Module) -> None:  # a compiled UNet (sampling.compile)
        self.unet = module

    scheduler_class = "PNDMScheduler"  # SD v1.4's, written into a saved folder

    def tokenizers(self) -> dict[str, CLIPTokenizer]:
        return {"tokenizer": self.tokenizer}

    def model_index(self) -> dict[str, Any] | None:
        """The ``model_index.json`` diffusers reads to load a saved folder (none without a VAE: the
        toy's folder is read by ``load_pretrained`` only)."""
        if self.vae is None:
            return None
        return {
            "_class_name": "StableDiffusionPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "PNDMScheduler"],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        }

    def text_encoder_slots(self) -> list[tuple[str, CLIPTokenizer, CLIPTextModel]]:
        """Each text encoder with its tokenizer, by the key of a textual-inversion file (SD v1: one,
        whose file holds the rows under the token's own name)."""
        return [("", self.tokenizer, self.text_encoder)]

    # ----------------------------------------------------------------- geometry
    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor) if self.vae is not None else 1.0

    latent_shift = 0.0  # SD v1's VAE has no shift

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
    def text_dim(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    def modules(self) -> dict[str, torch.nn.Module]:
        out = {"unet": self.unet, "text_encoder": self.text_encoder}
        if self.vae is not None:
            out["vae"] = self.vae
        return out

    # ------------------------------------------------------------------- text
    def tokenize(self, prompts: list[str]) -> TokenizedPrompts:
        """Pad to 77 with max-length padding and truncation, as Stable Diffusion does."""
        return clip_tokenize(self.tokenizer, prompts, self.device)

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

    def condition(self, tokens: TokenizedPrompts) -> Conditioning:
        """The UNet's conditioning: the text encoder's last hidden state (and its pooled vector)."""
        return Conditioning(*self.encode_ids(tokens.input_ids))

    def denoiser_call(self, latents: torch.Tensor, t, cond: Conditioning) -> tuple[tuple, dict]:
        """The UNet's arguments for ``latents`` at timestep(s) ``t`` (``denoise``; ESD's frozen copy)."""
        return (latents, t), {"encoder_hidden_states": cond.sequence}

    @staticmethod
    def prediction_of(output) -> torch.Tensor:
        return output.sample  # the predicted noise

    # ---------------------------------------------------------------- latents
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1], ``(B, 3, H, W)`` -> scaled latents (a VAE sample, or the images themselves)."""
        if self.vae is None:
            return images.to(device=self.device, dtype=self.dtype)
        # straight to the VAE's dtype: a float32 VAE sees the pixels unrounded (docs/methods.md 13)
        dist = self.vae.encode(images.to(device=self.device, dtype=self.vae.dtype)).latent_dist
        return dist.sample(generator=generator).to(self.dtype) * self.latent_scale

    def image_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents, the VAE posterior mean (deterministic; img2img)."""
        init = images.to(device=self.device, dtype=self.dtype)
        if self.vae is None:
            return init
        return self.vae.encode(init.to(self.vae.dtype)).latent_dist.mean.to(self.dtype) * self.latent_scale

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
