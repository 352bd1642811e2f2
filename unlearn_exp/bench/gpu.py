"""``make gpu-check``: one prepared script that measures what a GPU user needs to know, in one run.

    python -m unlearn_exp.bench.gpu                     # SD-v1.4-sized random weights, 512 px, 50 steps
    python -m unlearn_exp.bench.gpu --path /weights/stable-diffusion-v1-4
    python -m unlearn_exp.bench.gpu --smoke             # the tiny model on any device, in seconds (tests)

For fp16 and bf16 it measures images/s of plain CFG, SLD and SAFREE, ours beside diffusers'
``StableDiffusionPipeline`` / ``StableDiffusionPipelineSafe`` with the same seeds, and the max abs pixel
difference between ours and diffusers (tolerance ``TOLERANCE``: half precision reorders sums); the
peak GPU memory per method and batch size and the largest batch that fits (up to ``--max-batch``);
DUO training and concept-inversion steps/s; sampling through Lightning's predict with
``sampling.devices=1``; and the options GPU users expect (``torch.compile``, channels-last, TF32,
VAE slicing/tiling, the attention processor diffusers picked), each timed against the default.
It writes one JSON (``--out``) and prints one table. On the CPU (``--smoke``) memory is not measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from unlearn_exp.bench.sampling import sync

TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 6e-2}


def _timed(fn, repeats: int = 1) -> float:
    fn()  # warm-up (and compilation)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def _peak_mb(fn) -> float | None:
    if not torch.cuda.is_available():
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() / 2**20


def _model(args, dtype: torch.dtype):
    from unlearn_exp.bench.sampling import sd14_sized
    from unlearn_exp.models import build_tiny, load_pretrained

    if args.smoke:
        comps = build_tiny(resolution=32)
    elif args.path:
        comps = load_pretrained(args.path, name="sd14", resolution=args.resolution)
    else:
        comps = sd14_sized(args.resolution)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return comps.to(device=device, dtype=dtype)


def _methods(comps, args) -> dict[str, Any]:
    from unlearn_exp.guidance import SAFREE, SLD
    from unlearn_exp.guidance.sld import PRESETS
    from unlearn_exp.sampling import sample

    concept = "nudity, sexual"
    res, steps = comps.resolution, args.steps
    pipe = comps.to_diffusers(scheduler=comps.sampling_scheduler("dpmsolver++"))
    safe = comps.to_diffusers(scheduler=comps.sampling_scheduler("dpmsolver++"), safe=True)
    for p in (pipe, safe):
        p.set_progress_bar_config(disable=True)
    safe.safety_concept = concept
    sld = PRESETS["max"]
    common = dict(num_inference_steps=steps, height=res, width=res, output_type="pt")

    def gens(b):
        return [torch.Generator("cpu").manual_seed(s) for s in range(b)]

    return {
        "none": (
            lambda b: (
                sample(comps, ["a photo of a woman on a beach"] * b, list(range(b)), None, steps=steps).images
            ),
            lambda b: pipe(["a photo of a woman on a beach"] * b, generator=gens(b), **common).images,
        ),
        "sld": (
            lambda b: (
                sample(
                    comps,
                    ["a photo of a woman on a beach"] * b,
                    list(range(b)),
                    SLD(concept, sld),
                    steps=steps,
                ).images
            ),
            lambda b: (
                safe(
                    ["a photo of a woman on a beach"] * b,
                    generator=gens(b),
                    sld_warmup_steps=sld.warmup_steps,
                    sld_guidance_scale=sld.guidance_scale,
                    sld_threshold=sld.threshold,
                    sld_momentum_scale=sld.momentum_scale,
                    sld_mom_beta=sld.mom_beta,
                    **common,
                ).images
            ),
        ),
        "safree": (
            lambda b: (
                sample(
                    comps,
                    ["a photo of a woman on a beach"] * b,
                    list(range(b)),
                    SAFREE(concept.split(", "), concept),
                    steps=steps,
                ).images
            ),
            None,
        ),
    }


def _largest_batch(fn, start: int, cap: int) -> int | None:
    if not torch.cuda.is_available():
        return None
    best, b = None, start
    while b <= cap:
        try:
            fn(b)
            best = b
            b *= 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    return best


def _training(comps, args) -> dict[str, float]:
    from unlearn_exp.config import preset
    from unlearn_exp.inversion.concept_inversion import invert
    from unlearn_exp.unlearning.duo import train_adapter

    res, n = comps.resolution, args.train_steps
    images = torch.rand(4, 3, res, res) * 2 - 1
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        hp = preset(
            "checkpoint", "duo", beta=500.0, steps=n, batch=1 if args.smoke else 4, checkpoint_every=10**6
        )
        t = time.perf_counter()
        train_adapter(comps, (images, images.flip(0)), hp, adapter_name="bench", work_dir=Path(tmp) / "duo")
        out["duo_steps_per_s"] = n / (time.perf_counter() - t)
        cfg = preset(
            "inversion", "default", steps=n, checkpoint_every=10**6, eval_draws=0, init_word="person"
        )
        t = time.perf_counter()
        invert(comps, images, cfg, Path(tmp) / "inv", progress=False)
        out["inversion_steps_per_s"] = n / (time.perf_counter() - t)
    return out


def _options(comps, args) -> dict[str, Any]:
    """Each GPU option against the default, for plain CFG at batch 1 (seconds per image)."""
    from unlearn_exp.sampling import sample

    def run():
        return sample(comps, ["a photo"], [0], None, steps=args.steps)

    out: dict[str, Any] = {
        "attention_processor": type(
            comps.unet.attn_processors[next(iter(comps.unet.attn_processors))]
        ).__name__
    }
    out["default_s"] = _timed(run)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        out["tf32_s"] = _timed(run)
        torch.backends.cuda.matmul.allow_tf32 = False
    comps.unet.to(memory_format=torch.channels_last)
    out["channels_last_s"] = _timed(run)
    comps.unet.to(memory_format=torch.contiguous_format)
    if comps.vae is not None:
        comps.vae.enable_slicing()
        comps.vae.enable_tiling()
        out["vae_slicing_tiling_s"] = _timed(run)
        comps.vae.disable_slicing()
        comps.vae.disable_tiling()
    if not args.no_compile and torch.cuda.is_available():
        original = comps.unet
        try:
            comps.unet = torch.compile(original)
            out["compile_s"] = _timed(run, repeats=2)
        except Exception as exc:  # a compile failure is a finding, not a crash
            out["compile_error"] = str(exc).splitlines()[0][:200]
        finally:
            comps.unet = original
    return out


def _predict(comps, args) -> float:
    from unlearn_exp.sampling import predict_rows

    rows = [{"case_id": str(i), "prompt": "a photo", "seed": i, "image_index": 0} for i in range(4)]
    t = time.perf_counter()
    predict_rows(comps, None, rows, batch_size=2, devices=1, progress=False, steps=args.steps)
    return (time.perf_counter() - t) / len(rows)


def run(args) -> dict[str, Any]:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    report: dict[str, Any] = {
        "device": device,
        "date": time.strftime("%Y-%m-%d"),
        "steps": args.steps,
        "resolution": 32 if args.smoke else args.resolution,
        "results": {},
    }
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        comps = _model(args, dtype)
        res: dict[str, Any] = {}
        for name, (ours, theirs) in _methods(comps, args).items():
            with torch.no_grad():
                entry = {"ours_images_per_s": 1.0 / _timed(lambda o=ours: o(1))}
                if theirs is not None:
                    entry["diffusers_images_per_s"] = 1.0 / _timed(lambda t=theirs: t(1))
                    a = ((ours(1).float().cpu() + 1) / 2).clamp(0, 1)  # ours: [-1, 1]; diffusers: [0, 1]
                    b = theirs(1)
                    b = torch.from_numpy(b).permute(0, 3, 1, 2) if not torch.is_tensor(b) else b.float().cpu()
                    entry["max_abs_pixel_diff"] = float((a - b).abs().max())
                    entry["tolerance"] = TOLERANCE[dtype_name]
                entry["peak_mb"] = {str(b): _peak_mb(lambda o=ours, b=b: o(b)) for b in args.batches}
                entry["largest_batch"] = _largest_batch(ours, max(args.batches), args.max_batch)
            res[name] = entry
        res["training"] = _training(comps, args)
        res["predict_devices_1_s_per_image"] = _predict(comps, args)
        with torch.no_grad():
            res["options"] = _options(comps, args)
        report["results"][dtype_name] = res
        del comps
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return report


def table(report: dict[str, Any]) -> str:
    lines = [
        f"GPU check on {report['device']} ({report['date']}), {report['resolution']} px, "
        f"{report['steps']} steps",
        "| dtype | method | ours img/s | diffusers img/s | max abs diff (tol) | peak MiB (batches) "
        "| largest batch |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for dtype, res in report["results"].items():
        for m in ("none", "sld", "safree"):
            e = res[m]
            diff = f"{e['max_abs_pixel_diff']:.2e} ({e['tolerance']:g})" if "max_abs_pixel_diff" in e else "-"
            dif_rate = f"{e['diffusers_images_per_s']:.3f}" if "diffusers_images_per_s" in e else "-"
            peaks = ", ".join(
                f"{b}: {v:.0f}" if v is not None else f"{b}: -" for b, v in e["peak_mb"].items()
            )
            lines.append(
                f"| {dtype} | {m} | {e['ours_images_per_s']:.3f} | {dif_rate} | {diff} | {peaks} | "
                f"{e['largest_batch'] or '-'} |"
            )
        tr, op = res["training"], res["options"]
        lines.append(
            f"| {dtype} | training | DUO {tr['duo_steps_per_s']:.2f} steps/s | inversion "
            f"{tr['inversion_steps_per_s']:.2f} steps/s | predict(devices=1) "
            f"{res['predict_devices_1_s_per_image']:.3f} s/img | "
            + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in op.items())
            + " | |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the tiny model, 2 steps: seconds on any device")
    ap.add_argument("--path", help="a diffusers folder with real SD v1.4 weights (default: random SD-sized)")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4, 8])
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default="gpu_check.json")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.batches, args.max_batch, args.train_steps = 2, [1, 2], 4, 2
        if not torch.cuda.is_available():
            args.dtypes = ["float32"]
    from unlearn_exp.runtime import keep_freed_memory

    keep_freed_memory()  # as the sampler does, for ours and diffusers' pipelines alike
    report = run(args)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"written: {args.out}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
