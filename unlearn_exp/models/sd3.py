"""The SD3 family: Stable Diffusion 3's MMDiT, flow matching, CLIP-L + CLIP-G + T5 (docs/model_families.md).

``SD3Components`` provides what ``FamilyComponents`` asks, as diffusers' ``StableDiffusion3Pipeline``
does it:

- conditioning: the penultimate hidden states of CLIP-L (77 x 768) and CLIP-G (77 x 1280) joined on
  the feature axis, zero-padded to T5's width (4096) and followed by T5's 256 tokens (zeros of the
  transformer's joint width where T5 is off, ``model.t5: false``); the pooled vector is the two
  projected CLIP embeddings joined (768 + 1280 = 2048);
- the transformer predicts the flow velocity ``v = noise - x0``; the noisy latent at ``sigma`` is
  ``(1 - sigma) x0 + sigma noise``; sampling is flow-matching Euler with the scheduler config's
  shift (and its dynamic shift where the config asks for it);
- latents are ``(VAE sample - shift_factor) * scaling_factor``; a model without a VAE (the toy
  MMDiT, ``toy/mmdit.py``) denoises the images in [-1, 1] themselves, as the SD v1 toy does.

The pooled CLIP vector is the projection of the last hidden state at the first end-of-text token
(the tokenizer's EOS id), as for SD v1 (docs/methods.md 2): the same vector diffusers' pipeline
takes for every prompt, and the right one once learned tokens are added to the vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from unlearn_exp.errors import UserError
from unlearn_exp.models.components import Conditioning, FamilyComponents, TokenizedPrompts, clip_tokenize
from unlearn_exp.models.published_configs import SD3_MEDIUM
from unlearn_exp.models.tokenizer import BOS_ID, EOS_ID, build_clip_tokenizer, build_t5_tokenizer

MAX_SEQUENCE_LENGTH = 256  # T5 tokens, the pipeline's default
SAMPLERS = {"flow_euler": FlowMatchEulerDiscreteScheduler}
# SD3-medium's scheduler/scheduler_config.json
SD3_SCHEDULE = {"num_train_timesteps": 1000, "shift": 3.0}


@dataclass
class SD3Components(FamilyComponents):
    transformer: SD3Transformer2DModel
    text_encoder: CLIPTextModelWithProjection  # CLIP-L
    text_encoder_2: CLIPTextModelWithProjection  # CLIP-G
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    scheduler_config: dict[str, Any]
    vae: AutoencoderKL | None  # None: the identity latent path (pixels; the toy MMDiT)
    text_encoder_3: T5EncoderModel | None = None
    tokenizer_3: T5TokenizerFast | None = None
    resolution: int = 1024
    max_sequence_length: int = MAX_SEQUENCE_LENGTH
    name: str = "sd3"
    source: str = ""
    identity: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    family = "sd3"
    prediction = "flow"  # the transformer predicts the velocity noise - x0

    @property
    def denoiser(self) -> SD3Transformer2DModel:
        return self.transformer

    @denoiser.setter
    def denoiser(self, module: torch.nn.Module) -> None:  # a compiled transformer (sampling.compile)
        self.transformer = module

    def modules(self) -> dict[str, torch.nn.Module]:
        out = {
            "transformer": self.transformer,
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
        }
        if self.vae is not None:
            out["vae"] = self.vae
        if self.text_encoder_3 is not None:
            out["text_encoder_3"] = self.text_encoder_3
        return out

    def tokenizers(self) -> dict[str, Any]:
        out = {"tokenizer": self.tokenizer, "tokenizer_2": self.tokenizer_2}
        if self.tokenizer_3 is not None:
            out["tokenizer_3"] = self.tokenizer_3
        return out

    def text_encoder_slots(self) -> list[tuple[str, Any, torch.nn.Module]]:
        """Each text encoder with its tokenizer, by its key in a textual-inversion file (the SDXL
        convention, ``clip_l``/``clip_g``, and ``t5`` where T5 is loaded)."""
        slots = [
            ("clip_l", self.tokenizer, self.text_encoder),
            ("clip_g", self.tokenizer_2, self.text_encoder_2),
        ]
        if self.text_encoder_3 is not None:
            slots.append(("t5", self.tokenizer_3, self.text_encoder_3))
        return slots

    # ----------------------------------------------------------------- geometry
    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor) if self.vae is not None else 1.0

    @property
    def latent_shift(self) -> float:
        return float(self.vae.config.shift_factor or 0.0) if self.vae is not None else 0.0

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        res = resolution or self.resolution
        step = self.vae_factor * int(self.transformer.config.patch_size)
        if res % step:
            raise UserError(f"resolution {res} is not a multiple of {step} (the VAE factor x the patch size)")
        side = res // self.vae_factor
        return (int(self.transformer.config.in_channels), side, side)

    @property
    def text_dim(self) -> int:
        return int(self.transformer.config.joint_attention_dim)

    # ------------------------------------------------------------------- text
    def condition_prompts(self, prompts: list[str], text_length: int | None = None) -> Conditioning:
        return self.condition(self.tokenize(prompts, text_length))

    def tokenize(self, prompts: list[str], text_length: int | None = None) -> TokenizedPrompts:
        """Each encoder's ids: CLIP-L's in ``input_ids`` (77, max-length padding, truncated), CLIP-G's
        and T5's (``text_length``, default ``max_sequence_length``) in ``more``. ``truncated``: cut by
        CLIP."""
        prompts = list(prompts)
        tokens = clip_tokenize(self.tokenizer, prompts, self.device)  # CLIP-L's ids and truncation
        kw = {"padding": "max_length", "max_length": self.tokenizer.model_max_length, "truncation": True}
        tokens.more["clip_g"] = self.tokenizer_2(prompts, return_tensors="pt", **kw).input_ids.to(self.device)
        if self.tokenizer_3 is not None:
            enc3 = self.tokenizer_3(
                prompts,
                padding="max_length",
                max_length=text_length or self.max_sequence_length,
                truncation=True,
                add_special_tokens=True,
                return_tensors="pt",
            )
            tokens.more["t5"] = enc3.input_ids.to(self.device)
        elif text_length:  # no T5: its zeros at this length
            tokens.more["t5_length"] = torch.tensor(int(text_length))
        return tokens

    @staticmethod
    def clip_embeddings(encoder, input_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One CLIP encoder: its penultimate hidden states ``(B, 77, D)`` and its projected pooled vector
        ``(B, P)``, pooled at the first EOS token."""
        out = encoder(input_ids, output_hidden_states=True)
        eos = (input_ids == eos_id).int().argmax(dim=-1)
        last = out.last_hidden_state
        pooled = encoder.text_projection(last[torch.arange(last.shape[0], device=last.device), eos])
        return out.hidden_states[-2], pooled

    def t5_embeddings(
        self, input_ids: torch.Tensor | None, batch: int, length: int | None = None
    ) -> torch.Tensor:
        """T5's last hidden state ``(B, 256, 4096)``, or zeros of the transformer's width without T5."""
        if self.text_encoder_3 is None or input_ids is None:
            length = length or self.max_sequence_length
            shape = (batch, length, int(self.transformer.config.joint_attention_dim))
            return torch.zeros(shape, device=self.device, dtype=self.text_encoder.dtype)
        return self.text_encoder_3(input_ids.to(self.device))[0]

    def condition(self, tokens: TokenizedPrompts) -> Conditioning:
        """The transformer's conditioning, as ``StableDiffusion3Pipeline.encode_prompt`` builds it."""
        ids_l = tokens.input_ids.to(self.device)
        ids_g = tokens.more["clip_g"].to(self.device)
        h_l, p_l = self.clip_embeddings(self.text_encoder, ids_l, self.tokenizer.eos_token_id)
        h_g, p_g = self.clip_embeddings(self.text_encoder_2, ids_g, self.tokenizer_2.eos_token_id)
        clip = torch.cat([h_l.to(self.text_encoder.dtype), h_g.to(self.text_encoder.dtype)], dim=-1)
        length = int(tokens.more["t5_length"]) if "t5_length" in tokens.more else None
        t5 = self.t5_embeddings(tokens.more.get("t5"), ids_l.shape[0], length)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Conditioning(torch.cat([clip, t5], dim=-2), torch.cat([p_l, p_g], dim=-1))

    def denoiser_call(self, latents: torch.Tensor, t, cond: Conditioning) -> tuple[tuple, dict]:
        """The transformer's arguments: the velocity for ``latents`` at timestep(s) ``t`` (0-1000; one
        value is given to every row)."""
        t = torch.as_tensor(t, device=latents.device)
        timestep = t.reshape(-1).expand(latents.shape[0]) if t.numel() == 1 else t
        kwargs = {
            "hidden_states": latents,
            "timestep": timestep,
            "encoder_hidden_states": cond.sequence,
            "pooled_projections": cond.pooled,
            "return_dict": False,
        }
        return (), kwargs

    @staticmethod
    def prediction_of(output) -> torch.Tensor:
        return output[0]  # the velocity

    # ---------------------------------------------------------------- latents
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> latents ``(VAE sample - shift) * scale`` (the images, without a VAE)."""
        if self.vae is None:
            return images.to(device=self.device, dtype=self.dtype)
        dist = self.vae.encode(images.to(device=self.device, dtype=self.vae.dtype)).latent_dist
        return ((dist.sample(generator=generator) - self.latent_shift) * self.latent_scale).to(self.dtype)

    def image_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> latents from the VAE posterior mean (deterministic; img2img)."""
        if self.vae is None:
            return images.to(device=self.device, dtype=self.dtype)
        dist = self.vae.encode(images.to(device=self.device, dtype=self.vae.dtype)).latent_dist
        return ((dist.mean - self.latent_shift) * self.latent_scale).to(self.dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents.clamp(-1, 1)
        z = latents.to(self.vae.dtype) / self.latent_scale + self.latent_shift
        return self.vae.decode(z).sample.clamp(-1, 1)

    # ------------------------------------------------------------- schedulers
    def training_scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        """The flow-matching schedule (its sigmas and timesteps) for training losses."""
        return FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)

    def sampling_scheduler(self, name: str = "flow_euler"):
        if name not in SAMPLERS:
            raise UserError(
                f"sampler '{name}' does not run model '{self.name}' (family sd3): "
                f"choose one of {sorted(SAMPLERS)}"
            )
        return SAMPLERS[name].from_config(self.scheduler_config)

    def set_timesteps(self, scheduler, steps: int, latent_shape: tuple[int, ...]) -> None:
        """As the pipeline: the config's shift, or the dynamic shift ``mu`` of the image's token count."""
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            patch = int(self.transformer.config.patch_size)
            seq_len = (latent_shape[-2] // patch) * (latent_shape[-1] // patch)
            c = scheduler.config
            kwargs["mu"] = calculate_shift(
                seq_len,
                c.get("base_image_seq_len", 256),
                c.get("max_image_seq_len", 4096),
                c.get("base_shift", 0.5),
                c.get("max_shift", 1.16),
            )
        scheduler.set_timesteps(steps, device=self.device, **kwargs)

    def start_latents(self, scheduler, noise: torch.Tensor) -> torch.Tensor:
        return noise  # sigma = 1 at the first step: pure noise

    def img2img_start(self, steps: int, strength: float) -> int:
        """As ``StableDiffusion3Img2ImgPipeline.get_timesteps``."""
        return int(max(steps - min(steps * strength, steps), 0))

    def noise_to(
        self, scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        return scheduler.scale_noise(latents, t, noise)  # (1 - sigma) x0 + sigma noise

    def model_input(self, scheduler, latents: torch.Tensor, t) -> torch.Tensor:
        return latents  # flow matching scales nothing

    # the training objective, as DUO's SD3 script (train/unlearn-sd3.py; docs/methods.md 5.8)
    def training_timesteps(self, scheduler, n: int, t_min: int, t_max: int, generator) -> torch.Tensor:
        """``u`` uniform in ``[t_min, t_max) / N``, index ``floor(u N)`` into the scheduler's descending
        timesteps (so ``t_min=1, t_max=750`` draws sigma in (0.5, 1]: the high-noise part)."""
        n_train = int(scheduler.config.num_train_timesteps)
        r = torch.rand(n, generator=generator)
        u = r * t_max / n_train + (1 - r) * t_min / n_train
        index = (u * n_train).long().clamp(0, n_train - 1)
        return scheduler.timesteps[index]

    def timestep_near(self, scheduler, t: int) -> torch.Tensor:
        """The flow schedule's timestep nearest ``t`` (1000: pure noise), as a batch of one."""
        return scheduler.timesteps[(scheduler.timesteps - float(t)).abs().argmin()].reshape(1)

    def final_timestep(self, scheduler) -> torch.Tensor:
        """The preservation term's timestep: the last index of the descending schedule (sigma ~ 0.003),
        as the official SD3 script (its SD v1.4 script uses the first, pure noise)."""
        return scheduler.timesteps[int(scheduler.config.num_train_timesteps) - 1]

    @staticmethod
    def sigmas_at(scheduler, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Each timestep's sigma, looked up in the schedule (as the official script), shaped to ``like``."""
        timesteps = scheduler.timesteps.to(t.device)
        index = [int((timesteps == ti).nonzero()[0]) for ti in t.flatten()]
        sigma = scheduler.sigmas.to(device=like.device, dtype=like.dtype)[index]
        return sigma.view(-1, *([1] * (like.dim() - 1)))

    def training_input(self, scheduler, latents, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``(1 - sigma) x0 + sigma noise``; the preservation term's ``x0`` is the noise itself."""
        x0 = noise if latents is None else latents
        sigma = self.sigmas_at(scheduler, t, x0)
        return (1.0 - sigma) * x0 + sigma * noise

    def training_pair(self, scheduler, pred, x_t, latents, noise, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Preconditioned outputs (the script's default): the x0 estimate ``x_t - sigma v`` against
        ``x0`` (``sigma^2 |v - (noise - x0)|^2``); the preservation term compares two estimates."""
        sigma = self.sigmas_at(scheduler, t, x_t)
        return x_t - sigma * pred, (noise if latents is None else latents)

    # --------------------------------------------------------------- interop
    def to_diffusers(self, scheduler=None, safe: bool = False):
        """A plain ``StableDiffusion3Pipeline`` over the same modules (``PixelSD3Pipeline`` without a VAE)."""
        if safe:
            raise UserError("diffusers has no safe pipeline for SD3")
        if self.vae is None:
            from unlearn_exp.models.pixel_pipeline import PixelSD3Pipeline

            return PixelSD3Pipeline(
                self.transformer,
                self.text_encoder,
                self.text_encoder_2,
                self.tokenizer,
                self.tokenizer_2,
                scheduler or self.sampling_scheduler(),
            )
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(
            transformer=self.transformer,
            scheduler=scheduler or self.sampling_scheduler(),
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2,
            text_encoder_3=self.text_encoder_3,
            tokenizer_3=self.tokenizer_3,
        )

    def model_index(self) -> dict[str, Any]:
        """The ``model_index.json`` diffusers reads to load the folder ``save_components`` writes (a
        model without a VAE: ``PixelSD3Pipeline``, ``models/pixel_pipeline.py``)."""
        t5 = self.text_encoder_3 is not None
        if self.vae is None:
            return {
                "_class_name": "PixelSD3Pipeline",
                "transformer": ["diffusers", "SD3Transformer2DModel"],
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "tokenizer_2": ["transformers", "CLIPTokenizer"],
            }
        return {
            "_class_name": "StableDiffusion3Pipeline",
            "transformer": ["diffusers", "SD3Transformer2DModel"],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "text_encoder_3": ["transformers", "T5EncoderModel"] if t5 else [None, None],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "tokenizer_3": ["transformers", "T5TokenizerFast"] if t5 else [None, None],
        }

    scheduler_class = "FlowMatchEulerDiscreteScheduler"


# --------------------------------------------------------------------------- tiny
def _tiny_clip(text_dim: int, projection_dim: int) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=EOS_ID,
            hidden_size=text_dim,
            intermediate_size=37,
            layer_norm_eps=1e-5,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=projection_dim,
        )
    )


def build_tiny_sd3(seed: int = 0, resolution: int = 32, t5: bool = True) -> SD3Components:
    """Random SD3 components at the sizes diffusers' own SD3 pipeline tests use (transformer: one joint
    block, 4 heads of 8, joint width 32, pooled width 64; VAE: one level, shift 0.0609, scale 1.5035;
    T5: width 32), built in memory from ``seed``. The CLIP encoders are 16 wide (projection 32 each),
    so that CLIP-L + CLIP-G fill T5's width as in SD3 (768 + 1280 <= 4096) instead of being cropped.
    Tokenizers: the real CLIP tokenizer (CLIP-G's pads with "!", as SD3's ``tokenizer_2``) and the
    generated T5 tokenizer (``tokenizer.py``)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=resolution,
            patch_size=1,
            in_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=32,
            pooled_projection_dim=64,
            out_channels=4,
        )
        vae = AutoencoderKL(
            sample_size=resolution,
            in_channels=3,
            out_channels=3,
            block_out_channels=(4,),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=1,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.0609,
            scaling_factor=1.5035,
        )
        clip_l = _tiny_clip(16, 32)
        clip_g = _tiny_clip(16, 32)
        t5_encoder = (
            T5EncoderModel(
                T5Config(
                    d_model=32,
                    d_ff=37,
                    d_kv=8,
                    num_heads=4,
                    num_layers=2,
                    vocab_size=len(build_t5_tokenizer()),
                    pad_token_id=0,
                    eos_token_id=1,
                    decoder_start_token_id=0,
                    relative_attention_num_buckets=8,
                )
            )
            if t5
            else None
        )
    modules = (transformer, vae, clip_l, clip_g, t5_encoder)
    return with_project_tokenizers(modules, resolution, "tiny_sd3", f"built in memory (seed {seed})").freeze()


def with_project_tokenizers(
    modules: tuple, resolution: int, name: str, source: str, **extra
) -> SD3Components:
    """Components built in memory around the project's tokenizers: the real CLIP tokenizer twice
    (CLIP-G's padding with "!", id 0, as SD3's ``tokenizer_2``) and the generated T5 tokenizer.
    ``extra``: other fields (the toy MMDiT's schedule and T5 length), else SD3's. Not frozen."""
    transformer, vae, clip_l, clip_g, t5_encoder = modules
    tokenizer_2 = build_clip_tokenizer()
    tokenizer_2.pad_token = "!"
    return SD3Components(
        transformer=transformer,
        text_encoder=clip_l,
        text_encoder_2=clip_g,
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=tokenizer_2,
        vae=vae,
        text_encoder_3=t5_encoder,
        tokenizer_3=build_t5_tokenizer() if t5_encoder is not None else None,
        resolution=resolution,
        name=name,
        source=source,
        **{"scheduler_config": dict(SD3_SCHEDULE), **extra},
    )


def build_sd3_sized(resolution: int = 1024, t5: bool = True, seed: int = 0, device=None) -> SD3Components:
    """Random weights in SD3-medium's architecture (a 2B MMDiT, CLIP-L, CLIP-G, optionally T5-XXL's
    4.7B encoder), built on ``device`` (a GPU builds T5 in seconds): for the GPU benchmark. The
    tokenizers are the project's (CLIP's real vocabulary; a small generated T5 vocabulary, so T5's
    embedding table is smaller than SD3's, not its compute)."""
    clip = {
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": EOS_ID,
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        "layer_norm_eps": 1e-5,
    }
    with torch.random.fork_rng(), torch.device(device or "cpu"):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**SD3_MEDIUM["transformer"])
        vae = AutoencoderKL(**SD3_MEDIUM["vae"])
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**clip, **SD3_MEDIUM["text_encoder"]))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**clip, **SD3_MEDIUM["text_encoder_2"]))
        t5_encoder = T5EncoderModel(T5Config(**SD3_MEDIUM["text_encoder_3"])) if t5 else None
    modules = (transformer, vae, clip_l, clip_g, t5_encoder)
    return with_project_tokenizers(
        modules, resolution, "sd3-sized", "random weights in SD3-medium's architecture"
    ).freeze()


# --------------------------------------------------------------------------- folders
def load_sd3_folder(
    root: Path,
    name: str,
    resolution: int,
    t5: bool,
    dtype: torch.dtype,
    vae: bool = True,
    text_length: int | None = None,
) -> SD3Components:
    """A diffusers SD3 folder (``transformer/``, ``text_encoder(_2, _3)/``, ``tokenizer(_2, _3)/``,
    ``vae/``, ``scheduler/``); T5 left out where ``t5`` is false, as SD3's pipeline allows, and the VAE
    where ``vae`` is false (a pixel-space model: the toy MMDiT). ``text_length``: T5's token count (or
    its zeros' without T5); None: the pipeline's 256."""
    transformer = SD3Transformer2DModel.from_pretrained(root / "transformer", torch_dtype=dtype)
    clip_l = CLIPTextModelWithProjection.from_pretrained(root / "text_encoder", torch_dtype=dtype)
    clip_g = CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2", torch_dtype=dtype)
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(root / "tokenizer_2")
    autoencoder = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype) if vae else None
    with open(root / "scheduler" / "scheduler_config.json") as f:
        scheduler_config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    t5_encoder = T5EncoderModel.from_pretrained(root / "text_encoder_3", torch_dtype=dtype) if t5 else None
    tokenizer_3 = T5TokenizerFast.from_pretrained(root / "tokenizer_3") if t5 else None
    for tok in (tokenizer, tokenizer_2):
        tok.model_max_length = 77
    return SD3Components(
        transformer=transformer,
        text_encoder=clip_l,
        text_encoder_2=clip_g,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler_config=scheduler_config,
        vae=autoencoder,
        text_encoder_3=t5_encoder,
        tokenizer_3=tokenizer_3,
        resolution=resolution,
        max_sequence_length=MAX_SEQUENCE_LENGTH if text_length is None else int(text_length),
        name=name,
        source=str(root),
    ).freeze()
