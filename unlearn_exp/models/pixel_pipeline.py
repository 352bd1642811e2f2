"""A diffusers pipeline for a model without a VAE (the toy model): text-to-image in pixel space.

``StableDiffusionPipeline`` needs a VAE; a pixel-space model (the toy's UNet denoises 16x16 RGB
images directly) is this ``DiffusionPipeline`` with the same parts but ``vae``. It loads through
diffusers' own machinery from a folder with a ``model_index.json``::

    from unlearn_exp.models.pixel_pipeline import PixelDiffusionPipeline
    pipe = PixelDiffusionPipeline.from_pretrained("unlearn_exp/toy/weights/model")
    images = pipe(["a purple circle"], num_inference_steps=25, guidance_scale=6.0, seeds=[0]).images

Classifier-free guidance with the negative prompt, the scheduler of the folder (or one passed in),
and each image's initial noise from ``torch.Generator().manual_seed(seed)`` as our sampler draws it,
so the images equal ``sampling.sample`` with ``guidance=none`` (tested).

``PixelSD3Pipeline`` is the same for the SD3 family's pixel-space model (the toy MMDiT): the SD3
transformer, its two CLIP encoders (penultimate hidden states joined, projected pooled vectors joined,
as ``StableDiffusion3Pipeline.encode_prompt`` without T5 and with no zero tokens in T5's place) and
flow-matching Euler with CFG on the velocity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from PIL import Image


@dataclass
class PixelPipelineOutput(BaseOutput):
    images: list[Image.Image]
    tensors: torch.Tensor  # (B, 3, H, W) in [-1, 1]


def _prompts_and_noise(
    prompt: str | list[str], negative_prompt, seeds, config, resolution: int | None
) -> tuple[list[str], list[str], torch.Tensor]:
    """The prompts, their negative prompts and each image's initial noise (``torch.Generator`` seeded
    per image, as our sampler draws it) at the denoiser's ``sample_size`` unless ``resolution``."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = (
        negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * len(prompts)
    )
    seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
    size = int(resolution or config.sample_size)
    shape = (config.in_channels, size, size)
    noise = torch.stack(
        [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    )
    return prompts, negatives, noise


def _output(x: torch.Tensor) -> PixelPipelineOutput:
    """Pixels in [-1, 1] -> PIL images and the clamped tensors."""
    tensors = x.clamp(-1, 1).float().cpu()
    arrays = ((tensors + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return PixelPipelineOutput(
        images=[Image.fromarray(np.ascontiguousarray(a)) for a in arrays], tensors=tensors
    )


class PixelDiffusionPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self.device))[0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        seeds: list[int] | None = None,
        resolution: int | None = None,
    ) -> PixelPipelineOutput:
        prompts, negatives, noise = _prompts_and_noise(
            prompt, negative_prompt, seeds, self.unet.config, resolution
        )
        dtype = self.unet.dtype
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        x = noise.to(self.device, dtype) * self.scheduler.init_noise_sigma
        emb = torch.cat([self._encode(negatives), self._encode(prompts)]).to(dtype)
        for t in self.scheduler.timesteps:
            model_in = self.scheduler.scale_model_input(torch.cat([x, x]), t)
            eps_u, eps_c = self.unet(model_in, t, encoder_hidden_states=emb).sample.chunk(2)
            x = self.scheduler.step(eps_u + guidance_scale * (eps_c - eps_u), t, x).prev_sample
        return _output(x)


class PixelSD3Pipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer"

    def __init__(self, transformer, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler):
        super().__init__()
        self.register_modules(
            transformer=transformer,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            scheduler=scheduler,
        )

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        sequences, pooled = [], []
        encoders = ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2))
        for tokenizer, encoder in encoders:
            ids = tokenizer(
                prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
            ).input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=True)
            sequences.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        return torch.cat(sequences, dim=-1), torch.cat(pooled, dim=-1)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 28,
        guidance_scale: float = 7.0,
        negative_prompt: str | list[str] | None = None,
        seeds: list[int] | None = None,
        resolution: int | None = None,
    ) -> PixelPipelineOutput:
        prompts, negatives, noise = _prompts_and_noise(
            prompt, negative_prompt, seeds, self.transformer.config, resolution
        )
        dtype = self.transformer.dtype
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        x = noise.to(self.device, dtype)
        (seq_u, pooled_u), (seq_c, pooled_c) = self._encode(negatives), self._encode(prompts)
        seq, pooled = torch.cat([seq_u, seq_c]).to(dtype), torch.cat([pooled_u, pooled_c]).to(dtype)
        for t in self.scheduler.timesteps:
            v_u, v_c = self.transformer(
                hidden_states=torch.cat([x, x]),
                timestep=t.expand(2 * x.shape[0]),
                encoder_hidden_states=seq,
                pooled_projections=pooled,
                return_dict=False,
            )[0].chunk(2)
            x = self.scheduler.step(v_u + guidance_scale * (v_c - v_u), t, x, return_dict=False)[0]
        return _output(x)
