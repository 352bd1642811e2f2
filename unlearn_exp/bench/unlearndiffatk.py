"""Steps per second of the UnlearnDiffAtk optimisation (``attacks/unlearndiffatk.py``).

    python -m unlearn_exp.bench.unlearndiffatk [--model toy|tiny] [--steps 10] [--guidance none|sld]

Prints one JSON line: model, guidance, steps/s, and the seconds one attack with the paper's 40 steps
takes at that rate. At Stable Diffusion's size the attack needs a GPU (one UNet pass with gradients
through the text encoder per step, per branch of the guidance).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from unlearn_exp.bench import bench_model
from unlearn_exp.config import preset, typed_preset
from unlearn_exp.guidance.config import SLDConfig


def main(argv: list[str] | None = None) -> dict:
    from unlearn_exp.attacks.unlearndiffatk import AttackSettings, run_attack
    from unlearn_exp.guidance.base import Guidance
    from unlearn_exp.guidance.sld import SLD

    p = argparse.ArgumentParser(
        prog="python -m unlearn_exp.bench.unlearndiffatk", description=__doc__.splitlines()[0]
    )
    p.add_argument("--model", default="toy", choices=("toy", "tiny"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", default="none", choices=("none", "sld"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    comps = bench_model(args.model)
    target = (
        torch.rand(1, 3, comps.resolution, comps.resolution, generator=torch.Generator().manual_seed(0)) * 2
        - 1
    )
    guidance = (
        SLD("purple", typed_preset(SLDConfig, "sld", preset="max", warmup_steps=0))
        if args.guidance == "sld"
        else Guidance()
    )
    start = time.perf_counter()
    attack_cfg = preset("attack", "unlearndiffatk", steps=args.steps)
    settings = AttackSettings.from_cfg(attack_cfg, guidance_scale=6.0, num_steps=25)  # the toy's sampler
    run_attack(comps, target, "a grape", settings, guidance)
    rate = args.steps / (time.perf_counter() - start)
    out = {
        "model": args.model,
        "guidance": args.guidance,
        "threads": args.threads,
        "steps_per_s": round(rate, 2),
        "s_per_attack_40_steps": round(40 / rate, 1),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
