"""The toy model's architecture: Stable Diffusion's classes at toy size, with the identity latent path.

- ``UNet2DConditionModel`` on pixels (3 channels, 16x16; no VAE, so latents are the images in
  [-1, 1], ``Components(vae=None)``), cross- and self-attention at 8x8, 4x4 and in the mid block;
- ``CLIPTextModel`` with the real CLIP tokenizer (49,408 ids, 77 positions), trained from scratch
  with the UNet; its width is kept small because the token table alone is 49,408 x width;
- Stable Diffusion v1.4's DDPM noise schedule (scaled-linear 0.00085-0.012, 1000 steps, epsilon
  prediction), so every timestep convention of the SD stages carries over unchanged. Without a VAE
  this schedule keeps sqrt(abar_T) = 0.068 of the signal at the last step, so on the toy's pixels the
  image's mean colour stays readable from the initial noise; pretraining therefore uses offset
  noise (``pretrain.PretrainConfig.offset_noise``). A linear 1e-4..0.02 schedule was tried instead
  and made DPM-Solver++ diverge (x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) amplifies eps errors
  157 times at t = 999).

About 3.4M parameters (2.0M of them the token table), 6.9 MB in fp16.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from unlearn_exp.models.components import Components
from unlearn_exp.models.tiny import SD_SCHEDULE
from unlearn_exp.models.tokenizer import BOS_ID, EOS_ID, build_clip_tokenizer

TOY_SCHEDULE = dict(SD_SCHEDULE)

# v2 (docs/toy.md 1): 16 px, cross- and self-attention at 8x8, 4x4 and in the mid block, so that
# DUO's self-attention LoRA touches a share of the model comparable to SD's; 2.4 ms per UNet row on
# one CPU thread. v1 was 32 px, channels (32, 64, 64), attention only at 8x8 (8.9 ms per row).
TOY_ARCH = {
    "resolution": 16,
    "text_dim": 40,
    "text_layers": 3,
    "text_heads": 4,
    "text_ffn": 160,
    "unet_channels": (16, 32, 64),
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "down_blocks": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_blocks": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
}


def build_toy(seed: int = 0, **overrides) -> Components:
    """Fresh (untrained) toy components, deterministic in ``seed``."""
    arch = {**TOY_ARCH, **overrides}
    res = int(arch["resolution"])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=res,
            in_channels=3,
            out_channels=3,
            block_out_channels=tuple(arch["unet_channels"]),
            layers_per_block=int(arch["layers_per_block"]),
            down_block_types=tuple(arch["down_blocks"]),
            up_block_types=tuple(arch["up_blocks"]),
            cross_attention_dim=int(arch["text_dim"]),
            norm_num_groups=16,
            attention_head_dim=int(arch["attention_head_dim"]),
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                bos_token_id=BOS_ID,
                eos_token_id=EOS_ID,
                pad_token_id=EOS_ID,
                hidden_size=int(arch["text_dim"]),
                intermediate_size=int(arch["text_ffn"]),
                num_attention_heads=int(arch["text_heads"]),
                num_hidden_layers=int(arch["text_layers"]),
                vocab_size=49408,
                max_position_embeddings=77,
                layer_norm_eps=1e-5,
            )
        )
    return Components(
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(),
        scheduler_config=dict(TOY_SCHEDULE),
        vae=None,
        resolution=res,
        name="toy",
        source=f"built in memory (seed {seed})",
    )


def n_params(comps: Components) -> dict[str, int]:
    return {k: sum(p.numel() for p in m.parameters()) for k, m in comps.modules().items()}
