"""DUO (docs/methods.md 5): the objective, LoRA placement, training, diffusers interop, resume, caching."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from unlearn_exp.config import preset
from unlearn_exp.errors import UserError
from unlearn_exp.models import build_tiny
from unlearn_exp.store import ArtifactStore
from unlearn_exp.unlearning import apply_checkpoint
from unlearn_exp.unlearning.duo import (
    DUO,
    SELF_ATTENTION,
    adapters_disabled,
    add_lora,
    duo_key,
    output_preservation_loss,
    preference_loss,
    scaled_hyperparameters,
    train_adapter,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def toy_pairs(n: int = 4, res: int = 32):
    """Unsafe = bright images, safe = dark images (deterministic)."""
    g = torch.Generator().manual_seed(0)
    unsafe = torch.rand(n, 3, res, res, generator=g) * 0.5 + 0.5
    safe = -torch.rand(n, 3, res, res, generator=g) * 0.5 - 0.5
    return unsafe, safe


HP = preset(
    "checkpoint",
    "duo",
    beta=500,
    steps=6,
    batch=2,
    rank=4,
    alpha=4,
    lr_override=2e-3,
    checkpoint_every=2,
    seed=3,
)
DUO_CFG = preset("checkpoint", "duo", filter=None)  # conf/checkpoint/duo.yaml, no pair filter


def test_preference_loss_equals_hand_formula():
    noise = torch.zeros(2, 1, 1, 2)
    # per-image errors: mean of squares over C, H, W
    model_w = torch.tensor([[[[1.0, 1.0]]], [[[0.0, 2.0]]]])  # errors 1, 2
    ref_w = torch.tensor([[[[0.0, 2.0]]], [[[1.0, 1.0]]]])  # 2, 1
    model_l = torch.tensor([[[[3.0, 1.0]]], [[[0.0, 0.0]]]])  # 5, 0
    ref_l = torch.tensor([[[[1.0, 1.0]]], [[[2.0, 0.0]]]])  # 1, 2
    beta = 0.5
    loss, diff = preference_loss(model_w, ref_w, model_l, ref_l, noise, beta)
    d = [(1 - 2) - (5 - 1), (2 - 1) - (0 - 2)]  # -5, 3
    expected = sum(-math.log(1 / (1 + math.exp(beta * di))) for di in d) / 2
    assert diff.tolist() == pytest.approx(d)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    pp = output_preservation_loss(model_w, ref_w)
    assert float(pp) == pytest.approx(((1 - 0) ** 2 + (1 - 2) ** 2 + 1 + 1) / 4)


def test_scaling_and_bad_beta():
    assert scaled_hyperparameters(DUO_CFG, 250) == pytest.approx((1.2e-4, 2.5e6))
    assert scaled_hyperparameters(DUO_CFG, 2000) == pytest.approx((1.5e-5, 2e7))
    assert scaled_hyperparameters({**DUO_CFG, "lr_override": 1e-3, "lambda_override": 0}, 500) == (1e-3, 0.0)
    for beta in (0, -5):
        with pytest.raises(UserError, match="beta"):
            scaled_hyperparameters(DUO_CFG, beta)
    comps = build_tiny()
    with pytest.raises(UserError, match="checkpoint.beta must be > 0"):
        apply_checkpoint(comps, {**DUO_CFG, "beta": 0}, ArtifactStore("/nonexistent"), task_cfg={"name": "x"})
    with pytest.raises(UserError, match="DUOCheckpointConfig needs .*checkpoint.rank"):
        apply_checkpoint(comps, {"method": "duo", "beta": 500}, ArtifactStore("/nonexistent"), task_cfg={})


def test_lora_only_on_self_attention_and_reference_is_disabled_adapter():
    comps = build_tiny()
    params = add_lora(comps.unet, "duo", rank=4, alpha=4, init="gaussian", targets=SELF_ATTENTION, seed=0)
    lora_names = [n for n, _ in comps.unet.named_parameters() if "lora_" in n]
    assert lora_names and len(lora_names) == len(params)
    assert all(".attn1." in n for n in lora_names)
    wrapped = {n.split(".lora_")[0] for n in lora_names}
    assert {w.rsplit(".attn1.", 1)[1] for w in wrapped} == {"to_q", "to_k", "to_v", "to_out.0"}
    assert not any("attn2" in n for n in lora_names)
    assert all(p.requires_grad for p in params)
    assert sum(p.requires_grad for p in comps.unet.parameters()) == len(params)
    x, e = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)
    base = build_tiny().unet(x, 10, e).sample
    with torch.no_grad():
        for n, p in comps.unet.named_parameters():
            if "lora_B" in n:
                p.normal_()
        with adapters_disabled(comps.unet):
            ref = comps.unet(x, 10, e).sample
        model = comps.unet(x, 10, e).sample
    assert torch.allclose(ref, base, atol=1e-6)
    assert not torch.allclose(model, base, atol=1e-3)


def _train_and_eval(lambda_, tmp_path):
    # pixel-space tiny model (no VAE) at 16 px: the bright/dark preference is learnable in a few steps
    res = 16
    comps = build_tiny(vae=False, resolution=res)
    g = torch.Generator().manual_seed(0)
    unsafe = (0.7 + 0.1 * torch.randn(4, 3, res, res, generator=g)).clamp(-1, 1)
    safe = (-0.7 + 0.1 * torch.randn(4, 3, res, res, generator=g)).clamp(-1, 1)
    x_T = torch.randn(2, 3, res, res, generator=torch.Generator().manual_seed(9))
    c0 = comps.encode_prompts(["", ""])[0]
    with torch.no_grad():
        out_before = comps.unet(x_T, 999, c0).sample
    hp = {**HP, "steps": 16, "lr_override": 3e-3, "lambda_override": lambda_}
    train_adapter(
        comps, (unsafe, safe), hp, adapter_name="duo_t", work_dir=tmp_path / f"w{lambda_}", keep_adapter=True
    )
    module = DUO(comps, unsafe, safe, beta=500, lr=0, lambda_=0, batch=4)
    with adapters_disabled(comps.unet):
        before = module.evaluate(n_draws=16)
    after = module.evaluate(n_draws=16)
    with torch.no_grad():
        drift = float((comps.unet(x_T, 999, c0).sample - out_before).pow(2).mean())
    return before, after, drift


@pytest.mark.slow
def test_duo_steps_lower_preference_loss_and_regulariser_keeps_null_output(tmp_path):
    before, after, drift_reg = _train_and_eval(1e4, tmp_path)
    assert before["loss_dpo"] == pytest.approx(math.log(2), abs=1e-5)  # adapters off: model == reference
    assert after["loss_dpo"] < before["loss_dpo"] - 0.03
    _, after_free, drift_free = _train_and_eval(0.0, tmp_path)
    assert after_free["loss_dpo"] < before["loss_dpo"] - 0.03
    # the output-preservation term keeps eps(x_T, T, c_0) much closer to the original
    assert drift_reg < 0.3 * drift_free
    assert after["loss_pp"] < 0.3 * after_free["loss_pp"]


def _lora_files(tmp_path, names=("a", "b")):
    files = []
    for i, name in enumerate(names):
        comps = build_tiny()
        unsafe, safe = toy_pairs()
        train_adapter(
            comps,
            (unsafe, safe),
            {**HP, "steps": 2, "seed": i, "lambda_override": 0.0},
            adapter_name=f"duo_{name}",
            work_dir=tmp_path / f"w_{name}",
            out_dir=tmp_path / name,
        )
        assert not getattr(comps.unet, "peft_config", None)  # adapter removed after saving
        files.append(tmp_path / name / "pytorch_lora_weights.safetensors")
    return files


def _with_random_lora_b(files, tmp_path):
    """Make the (briefly trained) LoRAs clearly non-zero so the comparison can fail."""
    from safetensors.torch import load_file, save_file

    out = []
    for i, f in enumerate(files):
        sd = load_file(str(f))
        g = torch.Generator().manual_seed(i)
        sd = {k: (torch.randn(v.shape, generator=g) * 0.3 if "lora_B" in k else v) for k, v in sd.items()}
        dst = tmp_path / f"lora_{i}.safetensors"
        save_file(sd, str(dst), metadata={"format": "pt"})
        out.append(dst)
    return out


@pytest.mark.slow
def test_saved_lora_loads_into_plain_diffusers_pipeline_and_reproduces_images(tmp_path):
    from unlearn_exp.sampling import initial_noise, sample

    files = _with_random_lora_b(_lora_files(tmp_path), tmp_path)
    weights = [1.0, 0.5]
    ours = build_tiny()
    info = apply_checkpoint(
        ours,
        {**DUO_CFG, "beta": 500, "path": [str(f) for f in files], "adapter_weights": weights},
        ArtifactStore(tmp_path / "store"),
        task_cfg={"name": "violence"},
    )
    assert info["method"] == "duo" and info["source"] == "user" and len(info["files"]) == 2
    prompts, seeds = ["a photo", "a cat"], [0, 1]
    mine = sample(ours, prompts, seeds, steps=4, guidance_scale=5.0).images

    ref = build_tiny()
    pipe = ref.to_diffusers()
    for i, f in enumerate(files):
        pipe.load_lora_weights(str(f), adapter_name=f"v{i}")
    pipe.set_adapters(["v0", "v1"], adapter_weights=weights)
    latents = initial_noise(seeds, ref.latent_shape())
    theirs = pipe(
        prompts, num_inference_steps=4, guidance_scale=5.0, latents=latents, output_type="pt"
    ).images
    assert torch.allclose(mine, theirs * 2 - 1, atol=2e-4)
    plain = sample(build_tiny(), prompts, seeds, steps=4, guidance_scale=5.0).images
    assert (plain - mine).abs().max() > 1e-2  # the adapters do change the images


def test_lora_for_another_architecture_is_refused(tmp_path):
    files = _lora_files(tmp_path, names=("a",))
    other = build_tiny(unet_channels=(32, 96))
    with pytest.raises(UserError, match=r"LoRA shapes do not fit.*attn1"):
        apply_checkpoint(
            other,
            {**DUO_CFG, "beta": 500, "path": str(files[0])},
            ArtifactStore(tmp_path / "s"),
            task_cfg={},
        )
    from safetensors.torch import load_file, save_file

    sd = {k.replace("down_blocks", "input_blocks"): v for k, v in load_file(str(files[0])).items()}
    save_file(sd, str(tmp_path / "renamed.safetensors"))
    with pytest.raises(UserError, match=r"match no UNet layer.*input_blocks"):
        apply_checkpoint(
            build_tiny(),
            {**DUO_CFG, "beta": 500, "path": str(tmp_path / "renamed.safetensors")},
            ArtifactStore(tmp_path / "s"),
            task_cfg={},
        )
    torch.save(load_file(str(files[0])), tmp_path / "lora.pt")
    with pytest.raises(UserError, match="allow_pickle_conversion"):
        apply_checkpoint(
            build_tiny(),
            {**DUO_CFG, "beta": 500, "path": str(tmp_path / "lora.pt")},
            tmp_path / "s",
            task_cfg={},
        )
    info = apply_checkpoint(
        build_tiny(),
        {**DUO_CFG, "beta": 500, "path": str(tmp_path / "lora.pt"), "allow_pickle_conversion": True},
        tmp_path / "s",
        task_cfg={},
    )
    assert info["files"][0].endswith(".safetensors")


class _Interrupt(Exception):
    pass


@pytest.mark.slow
def test_interrupted_training_resumes_from_last_checkpoint(tmp_path):
    import lightning as L
    from safetensors.torch import load_file

    class StopAt(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 4:
                raise _Interrupt()

    unsafe, safe = toy_pairs()
    hp = {**HP, "steps": 6, "lambda_override": 10.0}
    comps = build_tiny()
    with pytest.raises(_Interrupt):
        train_adapter(
            comps, (unsafe, safe), hp, adapter_name="duo_r", work_dir=tmp_path / "w", callbacks=[StopAt()]
        )
    assert (tmp_path / "w" / "checkpoints" / "last.ckpt").is_file()
    assert not getattr(comps.unet, "peft_config", None)
    info = train_adapter(
        build_tiny(),
        (unsafe, safe),
        hp,
        adapter_name="duo_r",
        work_dir=tmp_path / "w",
        out_dir=tmp_path / "o",
    )
    assert info["resumed_from_step"] == 4 and info["steps"] == 6
    straight = train_adapter(
        build_tiny(),
        (unsafe, safe),
        hp,
        adapter_name="duo_r",
        work_dir=tmp_path / "w2",
        out_dir=tmp_path / "o2",
    )
    assert straight["resumed_from_step"] == 0
    a = load_file(str(tmp_path / "o" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "o2" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)


class ColourJudge:
    """Flags an image as unsafe when its mean brightness is above a threshold."""

    name = "colour"

    def __init__(self, threshold: float = 0.0):
        self.threshold = threshold

    def judge(self, pil):
        import numpy as np

        return [{"safe": bool(np.asarray(im).mean() / 127.5 - 1 <= self.threshold)} for im in pil]


@pytest.mark.slow
def test_checkpoint_duo_trains_once_per_beta_and_reuses_the_cache(tmp_path):
    recipe = {
        "adapters": [
            {
                "name": "Toy",
                "unsafe_prompts": ["a red square"],
                "safe_prompts": ["a blue square"],
                "n_pairs": 2,
                "strength": 0.75,
                "check_unsafe": False,
                "check_safe": False,
                "steps": 2,
            }
        ]
    }
    cfg = {
        **DUO_CFG,
        "beta": 250,
        "path": None,
        "batch": 2,
        "rank": 4,
        "alpha": 4,
        "checkpoint_every": 1,
        "pair_sampling": {"scheduler": "ddim", "steps": 2},
        "recipes": {"toy": recipe},
    }
    store = ArtifactStore(tmp_path / "cache")
    comps = build_tiny()
    info = apply_checkpoint(comps, cfg, store, task_cfg={"name": "toy"})
    assert info["source"] == "trained" and info["beta"] == 250
    assert comps.unet.active_adapters() == ["duo_Toy"]
    assert sorted(store.built) == sorted(
        [
            f"unlearning/duo_pairs/{p.name}"
            for p in (tmp_path / "cache/unlearning/duo_pairs").iterdir()
            if not p.name.endswith(".lock")
        ]
        + [f"unlearning/duo/{Path(info['artifact']).name}"]
    )
    metrics = Path(info["artifact"]) / "Toy" / "metrics.csv"
    assert metrics.is_file() and "duo/loss" in metrics.read_text().splitlines()[0]  # the stage's own keys
    assert not list((tmp_path / "cache/unlearning/duo").glob("*.work"))
    store2 = ArtifactStore(tmp_path / "cache")
    again = apply_checkpoint(build_tiny(), cfg, store2, task_cfg={"name": "toy"})
    assert again["id"] == info["id"] and store2.built == [] and again["sha256"] == info["sha256"]
    # another beta: a new checkpoint, but the pair set is reused
    store3 = ArtifactStore(tmp_path / "cache")
    other = apply_checkpoint(build_tiny(), {**cfg, "beta": 500}, store3, task_cfg={"name": "toy"})
    assert other["id"] != info["id"]
    assert [t.split("/")[1] for t in store3.built] == ["duo"]
    assert any(t.startswith("unlearning/duo_pairs/") for t in store3.reused)
    with pytest.raises(UserError, match="no DUO pair recipe for task 'other'"):
        apply_checkpoint(build_tiny(), cfg, store3, task_cfg={"name": "other"})


def test_condition_unsafe_conditions_the_preference_term_on_each_pairs_prompt(tmp_path):
    comps = build_tiny()
    unsafe, safe = toy_pairs()
    prompts = [f"prompt {i}" for i in range(len(unsafe))]
    add_lora(comps.unet, "duo_c", rank=4, alpha=4, init="gaussian", targets=SELF_ATTENTION, seed=0)
    seen = []
    forward = comps.unet.forward

    def spy(x, t, encoder_hidden_states=None, **kw):
        seen.append(encoder_hidden_states.detach().clone())
        return forward(x, t, encoder_hidden_states=encoder_hidden_states, **kw)

    comps.unet.forward = spy
    module = DUO(comps, unsafe, safe, beta=500, lr=0, lambda_=1.0, batch=2, prompts=prompts)
    idx = torch.tensor([3, 1])
    module.losses(idx, torch.Generator().manual_seed(0))
    cond = seen[0]  # the trained model's call: x_w, x_l at t, then the preservation noise at T
    expect = comps.encode_prompts([prompts[3], prompts[1]])[0]
    c0 = comps.encode_prompts([""])[0]
    assert torch.allclose(cond[:2], expect, atol=1e-5) and torch.allclose(cond[2:4], expect, atol=1e-5)
    assert torch.allclose(cond[4:], c0.expand(2, -1, -1), atol=1e-5)  # the preservation term keeps c_0
    with pytest.raises(UserError, match="2 pair prompts for"):
        DUO(comps, unsafe, safe, beta=500, lr=0, lambda_=1.0, prompts=prompts[:2])


def test_condition_at_its_neutral_value_leaves_the_checkpoint_key_unchanged():
    from unlearn_exp.identity import checkpoint_spec

    base = {**DUO_CFG, "beta": 250, "path": None, "steps": 3}
    assert checkpoint_spec({**base, "condition": "null"}) == checkpoint_spec(base)
    assert checkpoint_spec({**base, "condition": "unsafe"}) != checkpoint_spec(base)
    comps = build_tiny()
    recipe = {
        "recipes": {
            "toy": {
                "adapters": [
                    {
                        "name": "T",
                        "unsafe_prompts": ["a"],
                        "safe_prompts": ["b"],
                        "n_pairs": 1,
                        "strength": 0.5,
                    }
                ]
            }
        }
    }
    key = duo_key(comps, {**base, **recipe}, {"name": "toy"})
    assert duo_key(comps, {**base, **recipe, "condition": "null"}, {"name": "toy"}) == key
    assert duo_key(comps, {**base, **recipe, "condition": "unsafe"}, {"name": "toy"}) != key


@pytest.mark.slow
def test_a_lora_file_is_the_same_bytes_in_any_process(tmp_path):
    """peft keeps target_modules as a set, ordered by the process's string-hash seed: the LoRA file
    is written with it sorted, so the same weights are the same bytes (and the same content id)."""
    import subprocess
    import sys

    script = (
        "import sys, torch; from pathlib import Path; from peft import LoraConfig;"
        "from unlearn_exp.models import build_tiny; from unlearn_exp.unlearning.duo import save_lora;"
        "torch.manual_seed(0); c = build_tiny();"
        "c.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights='gaussian',"
        " target_modules=['attn1.to_q', 'attn1.to_k', 'attn1.to_v', 'attn1.to_out.0']), adapter_name='a');"
        "save_lora(c.unet, 'a', Path(sys.argv[1]))"
    )
    files = []
    for seed in ("1", "2", "3"):
        out = tmp_path / seed
        subprocess.run(
            [sys.executable, "-c", script, str(out)], check=True, env={**os.environ, "PYTHONHASHSEED": seed}
        )
        files.append((out / "pytorch_lora_weights.safetensors").read_bytes())
    assert files[0] == files[1] == files[2]


@pytest.mark.slow
def test_weight_and_embedding_files_are_the_same_bytes_in_any_process(tmp_path):
    """save_safetensors (ESD, UCE, converted pickles) and textual-inversion files carry one metadata
    entry: two came out in hash order, so the same tensors were different bytes per process."""
    import subprocess
    import sys

    script = (
        "import sys, torch; from pathlib import Path;"
        "from unlearn_exp.unlearning.weights import save_safetensors;"
        "from unlearn_exp.inversion.textual_inversion import save_textual_inversion;"
        "out = Path(sys.argv[1]); out.mkdir();"
        "save_safetensors({'w': torch.ones(3)}, out / 'w.safetensors', {'variant': 'xattn', 'b': '1'});"
        "save_textual_inversion(out / 'e.safetensors', ['<c*>'], torch.ones(1, 8), "
        "{'steps': 3, 'run_key': 'k'})"
    )
    got = []
    for seed in ("1", "2", "3", "4"):
        out = tmp_path / seed
        subprocess.run(
            [sys.executable, "-c", script, str(out)], check=True, env={**os.environ, "PYTHONHASHSEED": seed}
        )
        got.append(((out / "w.safetensors").read_bytes(), (out / "e.safetensors").read_bytes()))
    assert len(set(got)) == 1
