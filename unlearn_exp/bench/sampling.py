"""Seconds per image of our sampler (none / SLD / SAFREE) against diffusers' pipelines.

Same model, scheduler, steps and seeds; prints one line per method and the ratios the guided
sampling issue sets as targets: ours/none vs ``StableDiffusionPipeline`` (within 5%), ours/SLD vs
``StableDiffusionPipelineSafe`` (no slower), SAFREE over SLD-sized work (under 10% overhead).

    # tiny model, 64 px, CPU
    python -m unlearn_exp.bench.sampling
    # SD-v1.4-sized, random weights
    python -m unlearn_exp.bench.sampling --arch sd14 --resolution 512 --steps 50
    # real weights
    python -m unlearn_exp.bench.sampling --path /weights/stable-diffusion-v1-4
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from typing import Any

import torch

from unlearn_exp.config import typed_preset
from unlearn_exp.guidance import SAFREE, SLD
from unlearn_exp.guidance.config import SLDConfig
from unlearn_exp.models import Components, build_tiny, load_pretrained
from unlearn_exp.models.tiny import SD_SCHEDULE
from unlearn_exp.models.tokenizer import build_clip_tokenizer
from unlearn_exp.runtime import keep_freed_memory
from unlearn_exp.sampling import sample

PROMPT = "a photo of a woman on a beach, highly detailed"
CONCEPT = "nudity, sexual"


def sd14_sized(resolution: int) -> Components:
    """Random-weight components with Stable Diffusion v1.4's architecture (860M UNet, CLIP ViT-L/14 text)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        sample_size=512,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            max_position_embeddings=77,
            vocab_size=49408,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            hidden_act="quick_gelu",
            projection_dim=768,
        )
    )
    return Components(
        unet, text, build_clip_tokenizer(), dict(SD_SCHEDULE), vae, resolution, "sd14-sized"
    ).freeze()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time_interleaved(fns: dict[str, Any], repeats: int) -> dict[str, float]:
    """Seconds per call of each function: one warm-up call each, then ``repeats`` rounds that call
    every function once in turn; the median round of each. Interleaving puts the machine's drift
    (this project's CPU moves by 20-25% within minutes) on every side alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - start)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def run(comps: Components, steps: int, batch: int, repeats: int, scheduler: str) -> dict[str, float]:
    prompts, seeds = [PROMPT] * batch, list(range(batch))
    res = comps.resolution
    sld = SLD(CONCEPT, typed_preset(SLDConfig, "sld", preset="max"))  # warm-up 0: acts at every step

    def gen() -> list[torch.Generator]:
        """Fresh CPU generators per call, seeded as ours: each side starts every call from the same
        initial latents (a CUDA generator draws other numbers than the CPU one ours uses)."""
        return [torch.Generator("cpu").manual_seed(s) for s in seeds]

    pipe = comps.to_diffusers(scheduler=comps.sampling_scheduler(scheduler))
    pipe.set_progress_bar_config(disable=True)
    safe = comps.to_diffusers(scheduler=comps.sampling_scheduler(scheduler), safe=True)
    safe.set_progress_bar_config(disable=True)
    safe.safety_concept = CONCEPT
    common = dict(num_inference_steps=steps, height=res, width=res, output_type="pt")
    t = _time_interleaved(
        {
            "ours_none": lambda: sample(comps, prompts, seeds, None, scheduler=scheduler, steps=steps),
            "diffusers_none": lambda: pipe(prompts, generator=gen(), **common),
            "ours_sld": lambda: sample(comps, prompts, seeds, sld, scheduler=scheduler, steps=steps),
            "diffusers_sld": lambda: safe(
                prompts,
                generator=gen(),
                **sld.diffusers_arguments(),
                **common,
            ),
            "ours_safree": lambda: sample(
                comps, prompts, seeds, SAFREE(CONCEPT.split(", "), CONCEPT), scheduler=scheduler, steps=steps
            ),
        },
        repeats,
    )
    return {k: v / batch for k, v in t.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["tiny", "sd14"], default="tiny")
    ap.add_argument("--path", help="a diffusers folder with real weights (overrides --arch)")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scheduler", default="dpmsolver++")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: leave as is)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    keep_freed_memory()  # as the sampler does: ours and diffusers' pipelines alike (runtime.py)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.path:
        comps = load_pretrained(args.path, resolution=args.resolution)
    elif args.arch == "sd14":
        comps = sd14_sized(args.resolution)
    else:
        comps = build_tiny(resolution=args.resolution)
    if torch.cuda.is_available():
        comps.to(device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        t = run(comps, args.steps, args.batch, args.repeats, args.scheduler)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()}"
    print(
        f"model {comps.name} {args.resolution}px, {args.steps} steps, batch {args.batch}, "
        f"{args.scheduler}, {device}"
    )
    for k, v in t.items():
        print(f"  {k:16s} {v:8.4f} s/image")
    ratios = {
        "none: ours / diffusers (target <= 1.05)": t["ours_none"] / t["diffusers_none"],
        "sld: ours / diffusers safe (target <= 1.00)": t["ours_sld"] / t["diffusers_sld"],
        "safree / ours sld (target <= 1.10)": t["ours_safree"] / t["ours_sld"],
    }
    for k, v in ratios.items():
        print(f"  {k:44s} {v:6.3f}")
    print(json.dumps({"seconds_per_image": t, "ratios": ratios}))
    return {"seconds_per_image": t, "ratios": ratios}


if __name__ == "__main__":
    main()
