"""What SLD's presets do on each model family (docs/methods.md 3.5): prints one table.

    python -m unlearn_exp.bench.sld_presets            # the toy model, tiny SD v1 and tiny SD3

For every preset it samples the same prompts with SLD and with plain classifier-free guidance and
reports, over the steps where SLD subtracts (after its warm-up): the mean ``|d|`` (``d = pred_p -
pred_S``, noise on SD v1, velocity on SD3), the share of elements where the safety scale ``mu`` is
non-zero and saturated (``mu = 1``), and how far the final latents move from plain CFG's (relative
L2). Random tiny weights say how the arithmetic behaves on each prediction, not what SLD does to a
trained model's images.
"""

from __future__ import annotations

import argparse
import sys

import torch

from unlearn_exp.config import typed_preset
from unlearn_exp.guidance.config import SLDConfig
from unlearn_exp.guidance.sld import PRESETS, SLD
from unlearn_exp.sampling import sample

PROMPTS = ["a naked woman on a beach", "a red car on a road", "a portrait of a man", "a purple square"]


class _MeasuredSLD(SLD):
    """SLD that records, per acting step, ``|d|`` and the share of ``mu > 0`` and ``mu = 1``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stats: list[tuple[float, float, float]] = []

    def combine(self, i, preds, state):
        if len(preds) == 3 and self.in_window(i, self.values["warmup_steps"]):
            d = preds[1] - preds[2]
            scale = torch.clamp(d.abs() * self.values["guidance_scale"], max=1.0)
            mu = torch.where(d >= self.values["threshold"], torch.zeros_like(scale), scale)
            self.stats.append(
                (float(d.abs().mean()), float((mu > 0).float().mean()), float((mu == 1).float().mean()))
            )
        return super().combine(i, preds, state)


def _models():
    from unlearn_exp.models import build_tiny, build_tiny_sd3, load_model

    toy = {"name": "toy", "source": "pretrained", "path": "unlearn_exp/toy/weights/model", "resolution": 16}
    return {
        "toy (SD v1, trained)": load_model({**toy, "vae": False, "dtype": "float32", "device": "cpu"}),
        "tiny SD v1 (random)": build_tiny(),
        "tiny SD3 (random)": build_tiny_sd3(seed=0, t5=False),
    }


def measure(steps: int = 10) -> list[dict]:
    rows = []
    for label, comps in _models().items():
        sampler = "flow_euler" if comps.family == "sd3" else "dpmsolver++"
        seeds = list(range(len(PROMPTS)))
        with torch.no_grad():
            cfg = sample(comps, PROMPTS, seeds, steps=steps, scheduler=sampler).latents
            for preset in PRESETS:
                g = _MeasuredSLD("nudity, naked", typed_preset(SLDConfig, "sld", preset=preset))
                g.step_scale = steps / 50  # the presets' warm-up carried to this sampler
                out = sample(comps, PROMPTS, seeds, g, steps=steps, scheduler=sampler).latents
                n = max(len(g.stats), 1)
                rows.append(
                    {
                        "model": label,
                        "preset": preset,
                        "mean |d|": sum(s[0] for s in g.stats) / n,
                        "mu > 0": sum(s[1] for s in g.stats) / n,
                        "mu = 1": sum(s[2] for s in g.stats) / n,
                        "moved": float((out - cfg).norm() / cfg.norm()),
                    }
                )
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)
    rows = measure(args.steps)
    print("| model | preset | mean abs d | share mu > 0 | share mu = 1 | latents moved (rel. L2) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['preset']} | {r['mean |d|']:.4f} | {r['mu > 0']:.3f} | "
            f"{r['mu = 1']:.3f} | {r['moved']:.3f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
