"""``make gpu-check``: one prepared script that measures what a GPU user needs to know, in one run.

    python -m unlearn_exp.bench.gpu                     # SD-v1.4-sized random weights, 512 px, 50 steps
    python -m unlearn_exp.bench.gpu --path /weights/stable-diffusion-v1-4
    python -m unlearn_exp.bench.gpu --smoke             # the tiny model on any device, in seconds (tests)
    python -m unlearn_exp.bench.gpu --family sd3 --resolution 1024 --dtypes bfloat16   # SD3-medium-sized

For fp16 and bf16 it measures images/s of plain CFG, SLD and SAFREE, ours beside diffusers'
``StableDiffusionPipeline`` / ``StableDiffusionPipelineSafe`` with the same seeds, and the max abs pixel
difference between ours and diffusers (tolerance ``TOLERANCE``: half precision reorders sums); the
peak GPU memory per method and batch size and the largest batch that fits (up to ``--max-batch``);
DUO training and concept-inversion steps/s; sampling through Lightning's predict with
``sampling.devices=1``; and the options GPU users expect (``torch.compile``, channels-last, TF32,
VAE slicing/tiling, the attention processor diffusers picked), each timed against the default.
It writes one JSON (``--out``) and prints one table. On the CPU (``--smoke``) memory is not measured.
``--family sd3`` does the same on SD3-medium-sized random weights (or ``--path`` to an SD3 folder):
plain CFG against ``StableDiffusion3Pipeline`` from the same initial latents, SLD and SAFREE ours
alone (diffusers has no SD3 safe pipeline), DUO's SD3 recipe and concept inversion steps/s.

``--parity-fp32`` measures instead why ours and diffusers' ``StableDiffusionPipeline`` can differ on a GPU:
in float32, for the same components, prompt and seed, the max abs difference of the final latents and
of the images (and of ours against a second run of ours) under each numerical setting alone and all
together: TF32 off (matmul and cuDNN), cuDNN benchmark off, deterministic algorithms
(``CUBLAS_WORKSPACE_CONFIG=:4096:8`` is set before CUDA starts, for every setting), the math SDPA kernel
instead of the default, and the scheduler's sigmas in float64. It also records how each side draws its
initial latents and the dtype and device of each side's timesteps and sigmas. On the CPU the
CUDA-only switches are skipped (``--parity-fp32 --smoke``: the tiny model in seconds).

    python -m unlearn_exp.bench.gpu --parity-fp32                 # SD-v1.4-sized random weights, 512 px
    python -m unlearn_exp.bench.gpu --parity-fp32 --smoke         # the tiny model on any device (tests)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from unlearn_exp.bench.sampling import sync
from unlearn_exp.config import preset, typed_preset
from unlearn_exp.guidance.config import SLDConfig
from unlearn_exp.runtime import keep_freed_memory

TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 6e-2}


def _timed(fn, repeats: int = 1) -> float:
    fn()  # warm-up (and compilation)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def as_diffusers_images(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Our images ([-1, 1], float32) post-processed as diffusers' pipelines do it: ``x * 0.5 + 0.5``,
    clamped to [0, 1], in the model's dtype. Converting to float32 first, as the comparison did, alone
    differs from diffusers by up to 2e-3 in bf16 (its spacing near 1 is 2^-8) and 2.4e-4 in fp16; on
    the same footing the CPU gives ours equal to diffusers to the bit in every dtype."""
    return (images.to(dtype) * 0.5 + 0.5).clamp(0, 1).float().cpu()


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

    if args.family == "sd3":
        return _sd3_model(args, dtype)
    if args.smoke:
        comps = build_tiny(resolution=32)
    elif args.path:
        comps = load_pretrained(args.path, name="sd14", resolution=args.resolution)
    else:
        comps = sd14_sized(args.resolution)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return comps.to(device=device, dtype=dtype)


def _sd3_model(args, dtype: torch.dtype):
    """SD3: the tiny model (``--smoke``), a folder (``--path``), or SD3-medium-sized random weights
    built on the device (T5-XXL unless ``--no-t5``)."""
    from unlearn_exp.models import build_tiny_sd3, load_sd3
    from unlearn_exp.models.sd3 import build_sd3_sized

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        comps = build_tiny_sd3(resolution=32, t5=not args.no_t5)
    elif args.path:
        comps = load_sd3(args.path, name="sd3", resolution=args.resolution, t5=not args.no_t5)
    else:
        comps = build_sd3_sized(args.resolution, t5=not args.no_t5, device=device)
    return comps.to(device=device, dtype=dtype)


def _sd3_methods(comps, args) -> dict[str, Any]:
    """Ours against ``StableDiffusion3Pipeline`` for plain CFG; SLD and SAFREE (no diffusers pipeline)
    ours alone."""
    from unlearn_exp.guidance.safree import SAFREE
    from unlearn_exp.guidance.sld import SLD
    from unlearn_exp.sampling import sample

    concept, prompt = "nudity, sexual", "a photo of a woman on a beach"
    res, steps = comps.resolution, args.steps
    pipe = comps.to_diffusers()
    pipe.set_progress_bar_config(disable=True)
    sld = SLD(concept, typed_preset(SLDConfig, "sld", preset="max"))
    safree = SAFREE(concept.split(", "), concept) if comps.text_encoder_3 is not None else None
    kw = dict(steps=steps, scheduler="flow_euler", guidance_scale=7.0)

    def ours(g):
        return lambda b: sample(comps, [prompt] * b, list(range(b)), g, **kw).images

    def theirs(b):
        from unlearn_exp.sampling import initial_noise

        latents = initial_noise(list(range(b)), comps.latent_shape()).to(comps.device, comps.dtype)
        common = dict(num_inference_steps=steps, height=res, width=res, guidance_scale=7.0)
        return pipe([prompt] * b, latents=latents, output_type="pt", **common).images

    out = {"none": (ours(None), theirs), "sld": (ours(sld), None)}
    if safree is not None:  # SAFREE on SD3 reads T5
        out["safree"] = (ours(safree), None)
    return out


def _methods(comps, args) -> dict[str, Any]:
    if comps.family == "sd3":
        return _sd3_methods(comps, args)
    from unlearn_exp.guidance.safree import SAFREE
    from unlearn_exp.guidance.sld import SLD
    from unlearn_exp.sampling import sample

    concept = "nudity, sexual"
    res, steps = comps.resolution, args.steps
    pipe = comps.to_diffusers(scheduler=comps.sampling_scheduler("dpmsolver++"))
    safe = comps.to_diffusers(scheduler=comps.sampling_scheduler("dpmsolver++"), safe=True)
    for p in (pipe, safe):
        p.set_progress_bar_config(disable=True)
    safe.safety_concept = concept
    sld = SLD(concept, typed_preset(SLDConfig, "sld", preset="max"))
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
                    sld,
                    steps=steps,
                ).images
            ),
            lambda b: (
                safe(
                    ["a photo of a woman on a beach"] * b,
                    generator=gens(b),
                    **sld.diffusers_arguments(),
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
    from unlearn_exp.inversion.concept_inversion import invert
    from unlearn_exp.unlearning.duo import train_adapter

    res, n = comps.resolution, args.train_steps
    images = torch.rand(4, 3, res, res) * 2 - 1
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        option = "duo_sd3" if comps.family == "sd3" else "duo"
        hp = preset(
            "checkpoint", option, beta=500.0, steps=n, batch=1 if args.smoke else 4, checkpoint_every=10**6
        )
        hp["train_resolution"] = res
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

    sampler = "flow_euler" if comps.family == "sd3" else "dpmsolver++"

    def run():
        return sample(comps, ["a photo"], [0], None, steps=args.steps, scheduler=sampler)

    out: dict[str, Any] = {
        "attention_processor": type(
            comps.denoiser.attn_processors[next(iter(comps.denoiser.attn_processors))]
        ).__name__
    }
    out["default_s"] = _timed(run)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        out["tf32_s"] = _timed(run)
        torch.backends.cuda.matmul.allow_tf32 = False
    comps.denoiser.to(memory_format=torch.channels_last)
    out["channels_last_s"] = _timed(run)
    comps.denoiser.to(memory_format=torch.contiguous_format)
    if comps.vae is not None:
        comps.vae.enable_slicing()
        comps.vae.enable_tiling()
        out["vae_slicing_tiling_s"] = _timed(run)
        comps.vae.disable_slicing()
        comps.vae.disable_tiling()
    if not args.no_compile and torch.cuda.is_available():
        original = comps.denoiser
        try:
            comps.denoiser = torch.compile(original)
            out["compile_s"] = _timed(run, repeats=2)
        except Exception as exc:  # a compile failure is a finding, not a crash
            out["compile_error"] = str(exc).splitlines()[0][:200]
        finally:
            comps.denoiser = original
    return out


def _predict(comps, args) -> float:
    from unlearn_exp.sampling import predict_rows

    rows = [{"case_id": str(i), "prompt": "a photo", "seed": i, "image_index": 0} for i in range(4)]
    t = time.perf_counter()
    sampler = "flow_euler" if comps.family == "sd3" else "dpmsolver++"
    predict_rows(
        comps, None, rows, batch_size=2, devices=1, progress=False, steps=args.steps, scheduler=sampler
    )
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
                    a = as_diffusers_images(ours(1), dtype)
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


# ----------------------------------------------------------------------------- float32 parity
PARITY_PROMPT = "a photo of a woman on a beach"
PARITY_PARTS = ("no_tf32", "no_cudnn_benchmark", "deterministic", "math_sdpa", "scheduler_float64")
PARITY_SETTINGS = ("default", *PARITY_PARTS, "all")
CUDA_ONLY = frozenset({"no_tf32", "no_cudnn_benchmark"})
CUBLAS_WORKSPACE = ":4096:8"  # what deterministic cuBLAS needs; read when CUDA starts


def _torch_flags() -> dict[str, Any]:
    return {
        "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


@contextlib.contextmanager
def _switches(parts: set[str], cuda: bool):
    """Turn the settings in ``parts`` on for the block (the CUDA-only ones only on CUDA), then restore."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
        torch.are_deterministic_algorithms_enabled(),
    )
    try:
        with contextlib.ExitStack() as stack:
            if "no_tf32" in parts and cuda:
                torch.backends.cuda.matmul.allow_tf32 = False
                torch.backends.cudnn.allow_tf32 = False
            if "no_cudnn_benchmark" in parts and cuda:
                torch.backends.cudnn.benchmark = False
            if "deterministic" in parts:
                torch.use_deterministic_algorithms(True)
            if "math_sdpa" in parts:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[0], saved[1]
        torch.backends.cudnn.benchmark = saved[2]
        torch.use_deterministic_algorithms(saved[3])


def _float64_sigmas(sched):
    """The scheduler with its sigmas in float64 after ``set_timesteps``: the step's coefficients (ratios,
    logs and exponentials of sigmas) are computed in float64, then applied to the float32 sample."""
    set_timesteps = sched.set_timesteps

    def wrapped(*args, **kwargs):
        set_timesteps(*args, **kwargs)
        sched.sigmas = sched.sigmas.to(torch.float64)

    sched.set_timesteps = wrapped
    return sched


def _scheduler_arithmetic(sched) -> dict[str, str]:
    def where(t) -> str:
        return f"{str(t.dtype).replace('torch.', '')} on {t.device.type}"

    return {"class": type(sched).__name__, "timesteps": where(sched.timesteps), "sigmas": where(sched.sigmas)}


def _parity_ours(comps, steps: int, seed: int, make_sched):
    from unlearn_exp.sampling import sample

    made = []

    def factory(name: str = "dpmsolver++"):
        made.append(make_sched())
        return made[-1]

    comps.sampling_scheduler = factory  # this call's scheduler, kept to read its arithmetic
    try:
        out = sample(comps, [PARITY_PROMPT], [seed], None, steps=steps)
    finally:
        del comps.sampling_scheduler
    return out.latents, as_diffusers_images(out.images, torch.float32), made[-1]


def _parity_diffusers(comps, steps: int, seed: int, make_sched):
    sched = make_sched()
    pipe = comps.to_diffusers(scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    last: dict[str, torch.Tensor] = {}

    def keep_latents(pipeline, i, t, kwargs):
        last["latents"] = kwargs["latents"]
        return {}

    images = pipe(
        [PARITY_PROMPT],
        generator=[torch.Generator("cpu").manual_seed(seed)],  # where ours draws: one CPU generator per image
        num_inference_steps=steps,
        height=comps.resolution,
        width=comps.resolution,
        output_type="pt",
        callback_on_step_end=keep_latents,
        callback_on_step_end_tensor_inputs=["latents"],
    ).images
    return last["latents"].float().cpu(), images.float().cpu(), sched


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _initial_latents(comps, seed: int) -> dict[str, Any]:
    """Ours (``initial_noise``: a CPU generator per image) against diffusers' ``prepare_latents`` with the
    CPU generator the comparison passes it, and, on CUDA, against noise drawn by a CUDA generator."""
    from unlearn_exp.sampling import initial_noise

    shape = comps.latent_shape()
    sched = comps.sampling_scheduler("dpmsolver++")
    ours = initial_noise([seed], shape).to(comps.device, comps.dtype) * sched.init_noise_sigma
    pipe = comps.to_diffusers(scheduler=sched)
    theirs = pipe.prepare_latents(
        1,
        shape[0],
        comps.resolution,
        comps.resolution,
        comps.dtype,
        comps.device,
        [torch.Generator("cpu").manual_seed(seed)],
    )
    out: dict[str, Any] = {
        "ours": "torch.Generator('cpu').manual_seed(seed) per image, float32, moved to the device",
        "diffusers": "generator=[torch.Generator('cpu').manual_seed(seed)]: randn_tensor draws on the CPU",
        "max_abs_diff": _max_abs(ours.cpu(), theirs.cpu()),
    }
    if torch.cuda.is_available():
        on_gpu = torch.randn((1, *shape), generator=torch.Generator("cuda").manual_seed(seed), device="cuda")
        out["cuda_generator_max_abs_diff"] = _max_abs(ours.cpu(), on_gpu.cpu())
    return out


def run_parity(args) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    comps = _model(args, torch.float32)  # the same components as the throughput checks, in fp32
    seed = 0
    report: dict[str, Any] = {
        "mode": "parity-fp32",
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "steps": args.steps,
        "resolution": comps.resolution,
        "defaults": _torch_flags(),
        "attention_processor": type(
            comps.unet.attn_processors[next(iter(comps.unet.attn_processors))]
        ).__name__,
        "initial_latents": _initial_latents(comps, seed),
        "settings": {},
    }

    def plain():
        return type(comps).sampling_scheduler(comps, "dpmsolver++")

    default_images = None
    for setting in PARITY_SETTINGS:
        parts = set(PARITY_PARTS) if setting == "all" else ({setting} - {"default"})
        entry: dict[str, Any] = {
            "applied": sorted(p for p in parts if cuda or p not in CUDA_ONLY),
            "skipped_no_cuda": sorted(p for p in parts if not cuda and p in CUDA_ONLY),
        }
        if setting in CUDA_ONLY and not cuda:
            report["settings"][setting] = entry
            continue
        make = (lambda: _float64_sigmas(plain())) if "scheduler_float64" in parts else plain
        try:
            with torch.no_grad(), _switches(parts, cuda):
                lat_a, img_a, sched_a = _parity_ours(comps, args.steps, seed, make)
                lat_b, img_b, sched_b = _parity_diffusers(comps, args.steps, seed, make)
                lat_r, img_r, _ = _parity_ours(comps, args.steps, seed, make)
                entry["flags"] = _torch_flags()
            entry.update(
                latents_max_abs_diff=_max_abs(lat_a, lat_b),
                images_max_abs_diff=_max_abs(img_a, img_b),
                # random weights decode to saturated images: one pixel that flips between 0 and 1 makes
                # the max 1.0, the mean says how much of the image moved
                images_mean_abs_diff=float((img_a - img_b).abs().mean()),
                ours_repeat_latents_max_abs_diff=_max_abs(lat_a, lat_r),
                ours_repeat_images_max_abs_diff=_max_abs(img_a, img_r),
                # how far this setting moves ours from ours under the defaults: the size of a difference
                # that a change of kernel alone makes after ``steps`` steps
                ours_vs_default_images_max_abs_diff=_max_abs(img_a, default_images)
                if default_images is not None
                else 0.0,
                scheduler={
                    "ours": _scheduler_arithmetic(sched_a),
                    "diffusers": _scheduler_arithmetic(sched_b),
                },
                same_scheduler_config=dict(sched_a.config) == dict(sched_b.config),
            )
        except Exception as exc:  # e.g. an op without a deterministic kernel: a finding, not a crash
            entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        if setting == "default" and "error" not in entry:
            default_images = img_a
        report["settings"][setting] = entry
    return report


def parity_table(report: dict[str, Any]) -> str:
    init = report["initial_latents"]
    lines = [
        f"float32 parity, ours vs diffusers' StableDiffusionPipeline, on {report['device']} "
        f"(torch {report['torch']}, {report['date']}), {report['resolution']} px, {report['steps']} steps",
        "defaults: " + ", ".join(f"{k}={v}" for k, v in report["defaults"].items()),
        f"attention processor: {report['attention_processor']}; initial latents ours vs diffusers: max abs "
        f"{init['max_abs_diff']:.2e}"
        + (
            f" (a CUDA generator's instead: {init['cuda_generator_max_abs_diff']:.2f})"
            if "cuda_generator_max_abs_diff" in init
            else ""
        ),
        "| setting | latents max abs | images max abs (mean) | ours vs ours: latents | images "
        "| ours vs ours at default: images | scheduler (ours; diffusers) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, e in report["settings"].items():
        if "error" in e:
            lines.append(f"| {name} | error: {e['error']} | | | | | |")
        elif "latents_max_abs_diff" not in e:
            lines.append(f"| {name} | skipped (no CUDA) | | | | | |")
        else:
            sc = e["scheduler"]
            arith = "; ".join(
                f"t {s['timesteps']}, sigma {s['sigmas']}" for s in (sc["ours"], sc["diffusers"])
            )
            lines.append(
                f"| {name} | {e['latents_max_abs_diff']:.2e} | {e['images_max_abs_diff']:.2e} "
                f"({e['images_mean_abs_diff']:.1e}) | "
                f"{e['ours_repeat_latents_max_abs_diff']:.2e} | {e['ours_repeat_images_max_abs_diff']:.2e} | "
                f"{e['ours_vs_default_images_max_abs_diff']:.2e} | {arith} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the tiny model, 2 steps: seconds on any device")
    ap.add_argument(
        "--family", default="sd1", choices=("sd1", "sd3"), help="sd3: SD3-medium-sized weights (1024 px)"
    )
    ap.add_argument("--no-t5", action="store_true", help="SD3 without T5 (and so without SAFREE)")
    ap.add_argument("--path", help="a diffusers folder with real SD v1.4 weights (default: random SD-sized)")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4, 8])
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--parity-fp32", action="store_true", help="float32 parity with diffusers per setting")
    ap.add_argument("--out", help="the JSON written (default: gpu_check.json, gpu_parity.json)")
    args = ap.parse_args(argv)
    if args.parity_fp32:
        # before CUDA starts: cuBLAS reads it when it creates its handle (deterministic matmuls need it)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        if args.smoke:
            args.steps = 2
        keep_freed_memory()
        report = run_parity(args)
        out = Path(args.out or "gpu_parity.json")
        out.write_text(json.dumps(report, indent=2))
        print(parity_table(report))
        print(f"written: {out}")
        return report
    args.out = args.out or "gpu_check.json"
    if args.smoke:
        args.steps, args.batches, args.max_batch, args.train_steps = 2, [1, 2], 4, 2
        if not torch.cuda.is_available():
            args.dtypes = ["float32"]

    keep_freed_memory()  # as the sampler does, for ours and diffusers' pipelines alike
    report = run(args)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"written: {args.out}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
