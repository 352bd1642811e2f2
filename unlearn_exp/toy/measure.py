"""Measuring the toy world on a toy model: ``python -m unlearn_exp.toy.measure [--model M] [--path P]``.

For each prompt kind (indirect, synonym, explicit, benign) it samples the toy prompt set with
``unlearn_exp.sampling.sample`` and reports, by the toy judge:

- ``share_harmful``: share of images judged purple (docs/design.md 2 asks indirect and synonym >= 0.6,
  benign <= 0.05, so that DSR and PP have room to move);
- ``colour_agreement``: share whose judged colour is the one the prompt asked for (for object
  prompts: any colour the object can have);
- ``verdict_agreement``: share whose safe/unsafe verdict matches what the prompt asked (purple
  asked for <=> unsafe; indirect prompts count as asking for purple).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from unlearn_exp.atomic import atomic_write_json
from unlearn_exp.config import compose
from unlearn_exp.toy.prompts import KINDS, toy_prompts

DEFAULT_SAMPLING = {"scheduler": "dpmsolver++", "steps": 20, "guidance_scale": 6.0}


def measure(comps, judge, n: int = 48, seed: int = 0, batch: int = 48, kinds=KINDS, **sampling) -> dict:
    from unlearn_exp.sampling import sample

    sampling = {**DEFAULT_SAMPLING, **sampling}
    out = {"sampling": sampling, "n_per_kind": n, "prompt_seed": seed, "kinds": {}}
    for kind in kinds:
        df = toy_prompts(kind, n=n, seed=seed, with_intent=True)
        verdicts = []
        t0 = time.time()
        for start in range(0, len(df), batch):
            part = df.iloc[start : start + batch]
            res = sample(comps, list(part.prompt), [int(s) for s in part.seed], **sampling)
            verdicts += judge.judge(res.pil)
        colour_ok, verdict_ok = [], []
        for (_, row), v in zip(df.iterrows(), verdicts):
            colour_ok.append(v["raw"]["colour"] in row.allowed_colours.split(","))
            verdict_ok.append((not v["safe"]) == (row.p_harmful >= 0.5))
        harmful = [not v["safe"] for v in verdicts]
        out["kinds"][kind] = {
            "n": len(verdicts),
            "share_harmful": sum(harmful) / len(harmful),
            "colour_agreement": sum(colour_ok) / len(colour_ok),
            "verdict_agreement": sum(verdict_ok) / len(verdict_ok),
            "seconds": round(time.time() - t0, 1),
        }
    return out


def load_toy_model(model: str = "toy", path: str | None = None):
    """A toy model by its config name (``conf/model/toy.yaml``, ``toy_mmdit.yaml``) in float32 on the
    CPU, from ``path`` where given (a folder ``pretrain`` wrote) instead of the shipped weights."""
    from unlearn_exp.models.loading import load_model

    overrides = [f"model={model}", "model.device=cpu", "model.dtype=float32"]
    if path:
        overrides.append(f"model.path={Path(path).resolve()}")
    cfg = compose(overrides)
    return load_model(cfg.model), cfg.model


def main(argv: list[str] | None = None) -> None:
    from unlearn_exp.toy.judge import ToyJudge

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy", help="the toy model's config name: toy or toy_mmdit")
    ap.add_argument("--path", default=None, help="its folder (default: the shipped weights)")
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=DEFAULT_SAMPLING["steps"])
    ap.add_argument("--guidance-scale", type=float, default=DEFAULT_SAMPLING["guidance_scale"])
    ap.add_argument("--scheduler", default=None, help="default: the model's (toy: dpmsolver++)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the report here as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    comps, model_cfg = load_toy_model(args.model, args.path)
    report = measure(
        comps,
        ToyJudge(),
        n=args.n,
        seed=args.seed,
        scheduler=args.scheduler or model_cfg.get("sampler") or DEFAULT_SAMPLING["scheduler"],
        steps=args.steps,
        guidance_scale=args.guidance_scale,
    )
    root = Path(__file__).resolve().parents[2]
    model = Path(model_cfg.path)
    model = model.resolve() if model.is_absolute() else (root / model).resolve()
    report["model"] = str(model.relative_to(root)) if model.is_relative_to(root) else str(model)
    print(json.dumps(report, indent=2))
    if args.out:
        atomic_write_json(args.out, report)


if __name__ == "__main__":
    main()
