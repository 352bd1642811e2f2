"""The toy MMDiT: Stable Diffusion 3's classes at toy size, on the toy world's pixels (``model=toy_mmdit``).

- ``SD3Transformer2DModel`` on pixels (3 channels, 16x16, patch 2: 64 image tokens), four joint
  text-image attention blocks as SD3's (the last one, as in SD3, updates the image stream only),
  width 64 (4 heads of 16), timestep and pooled-text modulation (adaLN-Zero);
- two ``CLIPTextModelWithProjection`` encoders in CLIP-L's and CLIP-G's places (32 wide each, 3
  layers, the real CLIP tokenizer), trained from scratch with the transformer: their penultimate
  hidden states joined on the feature axis are the 77 text tokens (joint width 64), their projected
  pooled vectors joined the pooled vector (64), as ``StableDiffusion3Pipeline.encode_prompt`` builds
  them; no T5 (``model.t5: false``) and no zero tokens in its place (``model.text_length: 0``);
- the flow-matching schedule (1000 training steps, shift 1.0: SD3's shift 3.0 compensates 4,096
  image tokens at 1024 px, the toy has 64), the velocity target ``noise - x0``, sampled with the
  family's flow-matching Euler;
- no VAE: the latents are the images in [-1, 1] (``SD3Components(vae=None)``), as the toy UNet's.

Pretrained on the toy world by ``python -m unlearn_exp.toy.pretrain --model toy_mmdit``
(``toy/RECIPE.md``).
"""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from unlearn_exp.models.sd3 import SD3Components, with_project_tokenizers
from unlearn_exp.models.tokenizer import BOS_ID, EOS_ID

TOY_MMDIT_SCHEDULE = {"num_train_timesteps": 1000, "shift": 1.0}

TOY_MMDIT_ARCH = {
    "resolution": 16,
    "patch_size": 2,
    "num_layers": 4,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "text_dim": 32,  # each CLIP encoder's width (and its projection)
    "text_layers": 3,
    "text_heads": 4,
    "text_ffn": 128,
}


def _clip(arch: dict) -> CLIPTextModelWithProjection:
    width = int(arch["text_dim"])
    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=EOS_ID,
            hidden_size=width,
            intermediate_size=int(arch["text_ffn"]),
            num_attention_heads=int(arch["text_heads"]),
            num_hidden_layers=int(arch["text_layers"]),
            vocab_size=49408,
            max_position_embeddings=77,
            layer_norm_eps=1e-5,
            projection_dim=width,
        )
    )


def build_toy_mmdit(seed: int = 0, **overrides) -> SD3Components:
    """Fresh (untrained) toy MMDiT components, deterministic in ``seed``."""
    arch = {**TOY_MMDIT_ARCH, **overrides}
    res, width = int(arch["resolution"]), int(arch["text_dim"])
    inner = int(arch["attention_head_dim"]) * int(arch["num_attention_heads"])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=res,
            patch_size=int(arch["patch_size"]),
            in_channels=3,
            out_channels=3,
            num_layers=int(arch["num_layers"]),
            attention_head_dim=int(arch["attention_head_dim"]),
            num_attention_heads=int(arch["num_attention_heads"]),
            joint_attention_dim=2 * width,  # CLIP-L + CLIP-G joined, nothing padded (no T5)
            caption_projection_dim=inner,
            pooled_projection_dim=2 * width,
            pos_embed_max_size=res // int(arch["patch_size"]),
        )
        clip_l, clip_g = _clip(arch), _clip(arch)
    return with_project_tokenizers(
        (transformer, None, clip_l, clip_g, None),
        res,
        "toy_mmdit",
        f"built in memory (seed {seed})",
        scheduler_config=dict(TOY_MMDIT_SCHEDULE),
        max_sequence_length=0,
    )
