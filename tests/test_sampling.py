"""The guided sampler: faithful to diffusers, batch-independent, loud on bad input."""

from __future__ import annotations

import pytest
import torch
from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig

from unlearn_exp.config import preset, typed_preset
from unlearn_exp.errors import UserError
from unlearn_exp.guidance import SLD
from unlearn_exp.guidance.config import SLDConfig
from unlearn_exp.guidance.sld import PRESETS
from unlearn_exp.sampling import predict_rows, sample


def _np(images):
    return ((images + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("scheduler", ["dpmsolver++", "pndm"])
def test_plain_cfg_matches_diffusers_pipeline(tiny, scheduler):
    ours = sample(tiny, ["a cat on a mat"], [11], scheduler=scheduler, steps=8)
    pipe = tiny.to_diffusers(scheduler=tiny.sampling_scheduler(scheduler))
    ref = pipe(
        ["a cat on a mat"],
        num_inference_steps=8,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(11),
        output_type="np",
    ).images
    assert abs(ref - _np(ours.images)).max() < 1e-5


@pytest.mark.parametrize("preset,scheduler", [(p, "dpmsolver++") for p in PRESETS] + [("strong", "pndm")])
@pytest.mark.slow
def test_sld_matches_diffusers_safe_pipeline(tiny, preset, scheduler):
    prompt, concept = "a naked woman on a beach", "nudity, sexual"
    sld = SLD(concept, typed_preset(SLDConfig, "sld", preset=preset))
    ours = sample(tiny, [prompt], [7], sld, scheduler=scheduler, steps=20)
    pipe = tiny.to_diffusers(scheduler=tiny.sampling_scheduler(scheduler), safe=True)
    pipe.safety_concept = concept
    ref = pipe(
        [prompt],
        num_inference_steps=20,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
        **sld.diffusers_arguments(),
    ).images
    assert sld.diffusers_arguments() == getattr(SafetyConfig, preset.upper())  # diffusers' own presets
    assert abs(ref - _np(ours.images)).max() < 1e-5


def test_sld_max_changes_the_image(tiny):
    plain = sample(tiny, ["a naked woman"], [3], steps=10)
    guided = sample(
        tiny, ["a naked woman"], [3], SLD("nudity", typed_preset(SLDConfig, "sld", preset="max")), steps=10
    )
    assert (plain.images - guided.images).abs().max() > 1e-2


def test_image_does_not_depend_on_batch(tiny):
    alone = sample(tiny, ["a cat"], [3], SLD("dog"), steps=6)
    batched = sample(tiny, ["a dog", "a cat", "x y z"], [9, 3, 4], SLD("dog"), steps=6)
    assert torch.allclose(alone.images[0], batched.images[1], atol=1e-5)


def test_predict_rows_keeps_order_and_metadata(tiny):
    rows = [
        {"case_id": f"c{i}", "prompt": f"a cat number {i}", "seed": i, "image_index": 0} for i in range(5)
    ]
    out = predict_rows(tiny, None, rows, batch_size=2, steps=3, progress=False)
    assert [r["case_id"] for r in out] == [f"c{i}" for i in range(5)]
    assert out[0]["image"].size == (32, 32) and out[0]["truncated"] is False
    direct = sample(tiny, ["a cat number 3"], [3], steps=3)
    assert torch.allclose(out[3]["image_tensor"], direct.images[0], atol=1e-5)


@pytest.mark.slow
def test_half_precision_paths_run_on_the_cpu(tiny):
    """What GPUs run (``model.dtype: auto`` -> float16, ``sampling.precision: auto`` -> 16-mixed)
    checked on the CPU with bfloat16 and float16: finite images near the float32 ones."""
    from unlearn_exp.models import build_tiny, load_model

    prompts, seeds = ["a cat", "a dog"], [1, 2]
    ref = sample(tiny, prompts, seeds, steps=4).images
    rows = [
        {"case_id": i, "prompt": p, "seed": s, "image_index": 0}
        for i, (p, s) in enumerate(zip(prompts, seeds))
    ]
    mixed = predict_rows(tiny, None, rows, precision="bf16-mixed", steps=4, progress=False)
    assert (torch.stack([r["image_tensor"] for r in mixed]) - ref).abs().max() < 0.15
    low = build_tiny()
    for dtype in (torch.bfloat16, torch.float16):
        low.to(dtype=dtype)
        assert low.unet.dtype == dtype
        for guidance in (None, SLD("dog", typed_preset(SLDConfig, "sld", preset="max"))):
            out = sample(low, prompts, seeds, guidance, steps=4).images
            assert out.dtype == torch.float32 and torch.isfinite(out).all()
        assert (sample(low, prompts, seeds, steps=4).images - ref).abs().max() < 0.15
    assert load_model(preset("model", "tiny", dtype="float16")).unet.dtype == torch.float16


def test_long_prompt_is_truncated_and_recorded(tiny):
    out = sample(tiny, ["word " * 100], [0], steps=2)
    assert out.meta[0]["truncated"] is True and out.meta[0]["n_tokens"] == 102


def test_nan_latents_raise_one_line_error(tiny):
    handle = tiny.unet.conv_out.register_forward_hook(lambda m, i, o: o * float("nan"))
    try:
        with pytest.raises(UserError, match="non-finite latents at sampling step 0"):
            sample(tiny, ["a cat"], [0], steps=3)
    finally:
        handle.remove()


def test_img2img_strength_keeps_the_init_image_closer(tiny):
    init = sample(tiny, ["a cat"], [1], steps=6).images
    weak = sample(tiny, ["a dog"], [2], steps=6, init_images=init, strength=0.3)
    strong = sample(tiny, ["a dog"], [2], steps=6, init_images=init, strength=1.0)
    with torch.no_grad():
        z0 = tiny.vae.encode(init).latent_dist.mean * tiny.latent_scale
    assert (weak.latents - z0).abs().mean() < 0.5 * (strong.latents - z0).abs().mean()
    with pytest.raises(UserError):
        sample(tiny, ["a dog"], [2], steps=6, init_images=init, strength=0.0)


def test_prompt_seed_count_mismatch(tiny):
    with pytest.raises(UserError):
        sample(tiny, ["a", "b"], [1], steps=2)


@pytest.mark.slow
def test_gpu_check_runs_in_smoke_mode(tmp_path):
    """The GPU check's --smoke mode: the tiny model, every measurement, ours equal to diffusers."""
    import json

    from unlearn_exp.bench import gpu

    report = gpu.main(["--smoke", "--no-compile", "--out", str(tmp_path / "gpu.json")])
    saved = json.loads((tmp_path / "gpu.json").read_text())
    res = saved["results"][next(iter(saved["results"]))]
    assert set(res) >= {"none", "sld", "safree", "training", "options", "predict_devices_1_s_per_image"}
    assert res["none"]["max_abs_pixel_diff"] <= res["none"]["tolerance"]
    assert res["sld"]["max_abs_pixel_diff"] <= res["sld"]["tolerance"]
    assert res["training"]["duo_steps_per_s"] > 0 and res["training"]["inversion_steps_per_s"] > 0
    assert res["options"]["attention_processor"] == "AttnProcessor2_0"  # diffusers picked SDPA
    assert report["device"] and "| none |" in gpu.table(report)


@pytest.mark.slow
def test_gpu_check_runs_for_the_sd3_family_in_smoke_mode(tmp_path):
    """``--family sd3 --smoke``: tiny SD3 components, CFG equal to StableDiffusion3Pipeline, SLD and
    SAFREE timed, DUO's SD3 recipe and inversion trained; the SD3-medium-sized builder is the
    published architecture (counted on the meta device: 2.03B transformer, 4.76B T5)."""
    import json

    from diffusers import SD3Transformer2DModel
    from transformers import T5Config, T5EncoderModel

    from unlearn_exp.bench import gpu
    from unlearn_exp.models.sd3 import SD3_MEDIUM

    gpu.main(["--smoke", "--family", "sd3", "--no-compile", "--out", str(tmp_path / "gpu.json")])
    res = json.loads((tmp_path / "gpu.json").read_text())["results"]["float32"]
    assert set(res) >= {"none", "sld", "safree", "training", "options"}
    assert res["none"]["max_abs_pixel_diff"] <= res["none"]["tolerance"]
    assert res["training"]["duo_steps_per_s"] > 0 and res["training"]["inversion_steps_per_s"] > 0
    assert res["options"]["attention_processor"] == "JointAttnProcessor2_0"
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**SD3_MEDIUM["transformer"])
        t5 = T5EncoderModel(T5Config(**SD3_MEDIUM["text_encoder_3"]))
    assert round(sum(p.numel() for p in transformer.parameters()) / 1e9, 2) == 2.03
    assert round(sum(p.numel() for p in t5.parameters()) / 1e9, 2) == 4.76


def test_gpu_parity_fp32_mode_runs_on_the_cpu_and_restores_every_switch(tmp_path, monkeypatch):
    """``--parity-fp32 --smoke``: every setting alone and all together, the CUDA-only switches skipped
    without CUDA; ours equal to diffusers (same initial latents, same scheduler arithmetic on both
    sides); the torch switches as they were before."""
    import json

    from unlearn_exp.bench import gpu

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", gpu.CUBLAS_WORKSPACE)  # removed again after the test
    before = gpu._torch_flags()
    before.pop("CUBLAS_WORKSPACE_CONFIG")
    report = gpu.main(["--parity-fp32", "--smoke", "--out", str(tmp_path / "parity.json")])
    after = gpu._torch_flags()
    after.pop("CUBLAS_WORKSPACE_CONFIG")
    assert after == before
    assert json.loads((tmp_path / "parity.json").read_text())["settings"].keys() == set(gpu.PARITY_SETTINGS)
    assert report["initial_latents"]["max_abs_diff"] == 0.0
    cuda = torch.cuda.is_available()
    for name, e in report["settings"].items():
        assert "error" not in e, (name, e)
        if name in gpu.CUDA_ONLY and not cuda:
            assert e["skipped_no_cuda"] == [name] and "latents_max_abs_diff" not in e
            continue
        assert e["same_scheduler_config"] and e["scheduler"]["ours"] == e["scheduler"]["diffusers"]
        sigmas = "float64" if name in ("scheduler_float64", "all") else "float32"
        assert e["scheduler"]["ours"]["sigmas"] == f"{sigmas} on cpu"
        if not cuda:  # on the CPU ours and diffusers agree to float32 rounding
            assert e["latents_max_abs_diff"] <= 1e-4 and e["images_max_abs_diff"] <= 1e-4, name
            assert e["ours_repeat_images_max_abs_diff"] == 0.0
    assert report["settings"]["all"]["applied"] == sorted(
        p for p in gpu.PARITY_PARTS if cuda or p not in gpu.CUDA_ONLY
    )
    table = gpu.parity_table(report)
    assert "| default |" in table and "| all |" in table
    assert ("skipped (no CUDA)" in table) == (not cuda)


def test_sampling_bench_times_every_side_in_turn(monkeypatch):
    """``make bench``'s sampling comparison on the tiny model, one round: every side timed, the
    ratios from those times, and the rounds interleaved (one call of each side in turn)."""
    from unlearn_exp.bench import sampling as bench

    order = []
    res = bench._time_interleaved({k: (lambda k=k: order.append(k)) for k in "ab"}, repeats=2)
    assert order == ["a", "b", "a", "b", "a", "b"] and set(res) == {"a", "b"}  # warm-up, then 2 rounds
    out = bench.main(["--steps", "2", "--batch", "1", "--repeats", "1", "--resolution", "32"])
    t = out["seconds_per_image"]
    assert set(t) == {"ours_none", "diffusers_none", "ours_sld", "diffusers_sld", "ours_safree"}
    assert all(v > 0 for v in t.values())
    ratio = out["ratios"]["none: ours / diffusers (target <= 1.05)"]
    assert ratio == t["ours_none"] / t["diffusers_none"]


def test_gpu_options_are_applied_when_asked(tiny):
    import copy

    from unlearn_exp.sampling import apply_gpu_options

    comps = copy.deepcopy(tiny)
    from tests.helpers import compose

    apply_gpu_options(comps, compose(["sampling.channels_last=true", "sampling.vae_slicing=true"]).sampling)
    assert comps.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert comps.vae.use_slicing


def test_gpu_options_that_are_on_are_part_of_the_sample_key():
    """An option may change an image's last bits: images sampled with it are cached apart. With every
    option off the key has no entry for them (the keys of images sampled before the options existed)."""
    from tests.helpers import compose
    from unlearn_exp.cell import sample_identity

    plain = sample_identity(compose([]), "cpu")
    assert "gpu_options" not in plain and plain["precision"] == "32-true"
    on = sample_identity(compose(["sampling.channels_last=true", "sampling.tf32=true"]), "cpu")
    assert on == {**plain, "gpu_options": ["channels_last", "tf32"]}
    assert sample_identity(compose([]), "cuda")["precision"] == "16-mixed"


SIGTERM_JOBS = {
    "sampling": """
from unlearn_exp.models import build_tiny
from unlearn_exp.sampling import predict_rows

comps = build_tiny(seed=0, resolution=32, vae=True)
rows = [{"case_id": f"c{i}", "prompt": f"a cat {i}", "seed": i, "image_index": 0} for i in range(400)]
predict_rows(comps, None, rows, batch_size=2, steps=20, progress=False)
""",
    "training": """
import sys, tempfile, time
import lightning as L
import torch
from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig
from unlearn_exp.training import fit

class Slow(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, i):
        time.sleep(0.02)
        return (self.w - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

fit(Slow(), steps=100000, work_dir=tempfile.mkdtemp(), checkpoint_every=1000, grad_clip=None, progress=False)
""",
}
LISTENING = """
import signal, threading, time

def tell_when_lightning_listens():  # Lightning installs its SIGTERM handler when predict/fit starts
    while signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        time.sleep(0.05)
    print("listening", flush=True)

threading.Thread(target=tell_when_lightning_listens, daemon=True).start()
"""


@pytest.mark.parametrize("what", sorted(SIGTERM_JOBS))
@pytest.mark.slow
def test_sigterm_stops_at_the_next_batch(what):
    """Lightning only notes SIGTERM: its predict loop never looks (a killed job sampled on to its end)
    and its fit loop exits with status 0. Both stop at the next batch now, with the status of a
    process ended by SIGTERM."""
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers import ROOT

    code = LISTENING + SIGTERM_JOBS[what] + "\nprint('finished', flush=True)\n"
    job = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert job.stdout.readline().strip() == "listening"
        sent = time.time()
        job.send_signal(signal.SIGTERM)
        out, err = job.communicate(timeout=120)
    finally:
        job.kill()
    assert job.returncode == 143, err[-2000:]
    assert "finished" not in out and time.time() - sent < 30
    assert f"SIGTERM: {what} stops here" in err


_SAMPLE_TOY = """
import hashlib, sys
from unlearn_exp import runtime
from unlearn_exp.models import load_model
from unlearn_exp.config import preset
from unlearn_exp.sampling import sample
comps = load_model(preset("model", "toy"))
out = sample(comps, ["a purple circle", "a blue square"] * 4, list(range(8)), steps=3)
print(runtime.keep_freed_memory(), hashlib.sha256(out.images.numpy().tobytes()).hexdigest())
"""


@pytest.mark.slow
def test_keeping_freed_memory_changes_no_image(tmp_path):
    """runtime.keep_freed_memory changes where memory comes from, never a result: the toy model's
    images are the same to the bit with glibc's default allocator (``UNLEARN_EXP_MALLOC=default``)."""
    import os
    import platform
    import subprocess
    import sys

    from unlearn_exp import runtime

    runs = {}
    for mode in ("keep", "default"):
        env = {**os.environ, "UNLEARN_EXP_MALLOC": mode}
        out = subprocess.run(
            [sys.executable, "-c", _SAMPLE_TOY], env=env, capture_output=True, text=True, check=True
        )
        runs[mode] = out.stdout.split()[-2:]
    on_glibc = platform.libc_ver()[0] == "glibc"
    assert runs["keep"][0] == str(on_glibc) and runs["default"][0] == "False"
    assert runs["keep"][1] == runs["default"][1]
    assert runtime.keep_freed_memory() is runtime.keep_freed_memory()  # once per process


@pytest.mark.slow
def test_the_model_stays_on_its_device_after_lightning_predict(tiny, monkeypatch):
    """Lightning moves the module it ran (which holds the shared model) to the CPU when predict ends;
    on a GPU the next stage then ran on the CPU. The sampler puts the model back where it was."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from unlearn_exp.models import build_tiny
    from unlearn_exp.sampling import predict_rows

    moved = []
    teardown = SingleDeviceStrategy.teardown

    def spy_teardown(self):
        teardown(self)
        moved.append("teardown")

    monkeypatch.setattr(SingleDeviceStrategy, "teardown", spy_teardown)
    comps = build_tiny()
    calls = []
    original_to = type(comps).to

    def spy_to(self, device=None, dtype=None):
        calls.append(str(device))
        return original_to(self, device, dtype)

    monkeypatch.setattr(type(comps), "to", spy_to)
    rows = [{"case_id": "a", "prompt": "a cat", "seed": 1, "image_index": 0}]
    predict_rows(comps, None, rows, batch_size=1, progress=False, steps=2)
    assert moved and calls and calls[-1] == str(comps.device)


@pytest.mark.slow
def test_large_finite_float16_latents_are_not_taken_for_non_finite(monkeypatch):
    """The non-finite check looked at the latents' sum, which overflows in float16 (16 x 4 x 64 x 64
    values of 1.5 sum past 65504) although every value is finite: SD-sized fp16 batches stopped."""
    from unlearn_exp.models import build_tiny

    comps = build_tiny()
    comps.to(dtype=torch.float16)
    sched = comps.sampling_scheduler("ddim")
    step = type(sched).step

    def big_step(self, eps, t, latents, **kw):
        out = step(self, eps, t, latents, **kw)
        out.prev_sample = torch.full_like(out.prev_sample, 1000.0)  # finite; their sum is not
        return out

    monkeypatch.setattr(type(sched), "step", big_step)
    out = sample(comps, ["a cat"] * 4, [1, 2, 3, 4], scheduler="ddim", steps=2)
    assert torch.isfinite(out.latents).all()
