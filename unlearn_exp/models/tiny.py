"""Random-weight components of Stable Diffusion's classes, small enough for unit tests.

UNet 1.4M, VAE 0.7M and CLIP text encoder 1.6M parameters, built in memory in well under a
second; the tokenizer is the real CLIP tokenizer (see ``tokenizer.py``).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from unlearn_exp.models.components import Components
from unlearn_exp.models.tokenizer import BOS_ID, EOS_ID, build_clip_tokenizer

# Stable Diffusion v1.4's noise schedule (scheduler/scheduler_config.json of the checkpoint).
SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
    "skip_prk_steps": True,
}


def build_tiny(
    seed: int = 0,
    resolution: int = 32,
    text_dim: int = 32,
    text_layers: int = 5,
    unet_channels: tuple[int, ...] = (32, 64),
    vae: bool = True,
) -> Components:
    """Build the ``tiny`` model deterministically from ``seed``."""
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=resolution // (2 if vae else 1),
            in_channels=4 if vae else 3,
            out_channels=4 if vae else 3,
            block_out_channels=tuple(unet_channels),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=text_dim,
            norm_num_groups=32,
            attention_head_dim=(2, 4),
        )
        autoencoder = (
            AutoencoderKL(
                block_out_channels=[32, 64],
                in_channels=3,
                out_channels=3,
                down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2,
                latent_channels=4,
                norm_num_groups=32,
                sample_size=resolution,
            )
            if vae
            else None
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                bos_token_id=BOS_ID,
                eos_token_id=EOS_ID,
                pad_token_id=EOS_ID,
                hidden_size=text_dim,
                intermediate_size=37,
                layer_norm_eps=1e-5,
                num_attention_heads=4,
                num_hidden_layers=text_layers,
                vocab_size=49408,
                max_position_embeddings=77,
            )
        )
    return Components(
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(),
        scheduler_config=dict(SD_SCHEDULE),
        vae=autoencoder,
        resolution=resolution,
        name="tiny",
        source=f"built in memory (seed {seed})",
    ).freeze()
