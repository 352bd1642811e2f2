"""A stand-in for Stable Diffusion v1.4 to smoke-test on: ``python -m unlearn_exp.models.standin DIR``.

It writes a small random-weight model in SD v1.4's folder layout (``model_index.json``, ``unet/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``vae/``, ``safety_checker/``,
``feature_extractor/``, as diffusers' ``save_pretrained`` writes them) with SD v1.4's classes, block
types, scheduler config, latent scale and CLIP's real tokenizer (49,408 ids, 77 positions), but a few
channels per block: the whole folder is a few MB and loads in a second. Every stage of the framework
runs on it exactly as on the real weights (``model=sd14 model.path=DIR``); its images are noise, so
its numbers mean nothing. A new machine's first command can be the smoke run on it::

    python -m unlearn_exp.models.standin /tmp/sd14-standin
    python -m unlearn_exp +experiment=nudity_duo +debug=default model.path=/tmp/sd14-standin multirun

The evaluation's other files (LPIPS's AlexNet trunk, prompt lists) are those of the real run:
``python -m unlearn_exp.assets`` names them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from unlearn_exp.atomic import atomic_dir
from unlearn_exp.errors import exit_status

# Stable Diffusion v1.4's scheduler/scheduler_config.json (diffusers' PNDMScheduler), key for key
SD14_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SD14_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "requires_safety_checker": True,
}
TEXT_DIM = 32  # SD v1.4: 768


def build_modules(seed: int = 0) -> dict:
    """SD v1.4's modules with few channels: the UNet's four blocks (three with cross-attention) and
    sample size 64, the VAE's four blocks (a factor of 8, latent scale 0.18215), a 12-layer CLIP text
    encoder, and a safety checker of the same classes."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModel

    from unlearn_exp.models.tokenizer import BOS_ID, EOS_ID

    text = dict(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID, vocab_size=49408,
        max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=64,
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=TEXT_DIM,
            attention_head_dim=8,
            norm_num_groups=16,
        )
        vae = AutoencoderKL(
            block_out_channels=(16, 16, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=16,
            sample_size=512,
            scaling_factor=0.18215,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=TEXT_DIM,
                intermediate_size=64,
                num_attention_heads=4,
                num_hidden_layers=12,
                **text,
            )
        )
        clip = CLIPConfig(
            text_config={**text, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                         "num_hidden_layers": 1},
            vision_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                           "num_hidden_layers": 1, "image_size": 32, "patch_size": 16},
            projection_dim=16,
        )  # fmt: skip
        safety_checker = StableDiffusionSafetyChecker(clip)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "safety_checker": safety_checker}


def write_standin(path: str | Path, seed: int = 0) -> Path:
    """Write the stand-in under ``path`` (atomically: all of it or nothing) and return it."""
    from transformers import CLIPImageProcessor
    from transformers.utils import logging as hf_logging

    from unlearn_exp.models.tokenizer import build_clip_tokenizer

    hf_logging.disable_progress_bar()  # a "Writing model shards" bar per module says nothing
    path = Path(path).expanduser()
    with atomic_dir(path) as tmp:
        for sub, module in build_modules(seed).items():
            module.save_pretrained(tmp / sub, safe_serialization=True)
        build_clip_tokenizer().save_pretrained(tmp / "tokenizer")
        CLIPImageProcessor(crop_size={"height": 32, "width": 32}, size={"shortest_edge": 32}).save_pretrained(
            tmp / "feature_extractor"
        )
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD14_SCHEDULER, indent=2))
        (tmp / "model_index.json").write_text(json.dumps(SD14_INDEX, indent=2))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m unlearn_exp.models.standin", description=__doc__.splitlines()[0]
    )
    ap.add_argument("path", help="the folder to write (replaced if it exists)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    def run() -> int:
        out = write_standin(args.path, args.seed)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
        print(f"wrote a random-weight stand-in of SD v1.4 ({size:.1f} MiB) to {out}; smoke run:")
        print(f"  python -m unlearn_exp +experiment=nudity_duo +debug=default model.path={out} multirun")
        return 0

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
