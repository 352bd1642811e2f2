"""DUO on SD3 (docs/methods.md 5.8): the objective and one optimiser step equal to a re-statement of
naver-ai/DUO's ``train/unlearn-sd3.py`` step on tiny SD3 components; the timestep window; LoRA files
in diffusers' SD3 format, loaded back; the recipe composes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import compose
from unlearn_exp.models import build_tiny_sd3
from unlearn_exp.unlearning.duo import DUO, adapters_disabled, add_lora, load_adapters, train_adapter

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture
def sd3():
    comps = build_tiny_sd3(seed=0, resolution=16)
    add_lora(comps.transformer, "duo", rank=4, alpha=4, init="gaussian", targets=TARGETS, seed=0)
    # lora_B starts at zero (the model equals the reference): give it values so the losses are not trivial
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for n, p in comps.transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return comps


# ---- the official step, re-stated (naver-ai/DUO train/unlearn-sd3.py, batch 1 per process)
def official_loss(transformer, scheduler, x0_unsafe, x0_safe, noise, timesteps, embeds, pooled, beta, lam):
    b = len(noise)
    model_input = torch.cat([x0_unsafe, x0_safe, noise])
    schedule = scheduler.timesteps
    index = [(schedule == t).nonzero().item() for t in timesteps]
    sigmas = scheduler.sigmas[index].flatten()
    while len(sigmas.shape) < model_input.ndim:
        sigmas = sigmas.unsqueeze(-1)
    noisy = (1.0 - sigmas) * model_input + sigmas * noise.repeat(3, 1, 1, 1)
    kw = dict(encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)
    model_pred = transformer(hidden_states=noisy, timestep=timesteps, **kw)[0]
    with torch.no_grad(), adapters_disabled(transformer):
        ref_pred = transformer(hidden_states=noisy, timestep=timesteps, **kw)[0]
    model_pred = model_pred * (-sigmas) + noisy
    ref_pred = ref_pred * (-sigmas) + noisy
    target = model_input
    weighting = torch.ones_like(sigmas)  # compute_loss_weighting_for_sd3("logit_normal", ...)

    def mse(x, y, w):
        return torch.mean((w.float() * (x.float() - y.float()) ** 2).reshape(y.shape[0], -1), 1)

    m_u, m_s, m_p = model_pred.chunk(3)
    r_u, r_s, r_p = ref_pred.chunk(3)
    t_u, t_s, _ = target.chunk(3)
    w_u, w_s, _ = weighting.chunk(3)
    loss_pred = mse(m_u, t_u, w_u) - mse(r_u, t_u, w_u)
    loss_base = mse(m_s, t_s, w_s) - mse(r_s, t_s, w_s)
    diff = loss_base - loss_pred
    dpo = (-F.logsigmoid(-beta * diff)).mean()
    prior = F.mse_loss(m_p, r_p)
    assert b == len(x0_unsafe)
    return dpo + lam * prior


def _draw(comps, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (b, *comps.latent_shape())
    z_u, z_s, noise = (torch.randn(shape, generator=g) for _ in range(3))
    sched = comps.training_scheduler()
    t = comps.training_timesteps(sched, 2 * b, 1, 750, g)  # [safe..., unsafe...] as DUO.objective
    return z_u, z_s, noise, t, sched


def _module(comps, n=2, beta=500.0, lam=5e6 * 1e-6):
    images = torch.zeros(n, 3, 16, 16)
    return DUO(comps, images, images, beta=beta, lr=6e-6, lambda_=lam, batch=n, text_length=77)


@pytest.mark.parametrize("b", [1, 2])
def test_objective_equals_the_official_sd3_step(sd3, b):
    z_u, z_s, noise, t, sched = _draw(sd3, b)
    module = _module(sd3, n=b)
    c0 = sd3.condition_prompts([""], text_length=77)
    assert c0.sequence.shape[1] == 77 + 77  # CLIP 77 + T5 77, as the script's max_sequence_length
    ours = module.objective(torch.cat([z_s, z_u]), noise, t, c0.expand(3 * b))["loss"]
    t_safe, t_unsafe = t[:b], t[b:]
    final = sched.timesteps[999].repeat(b)
    ref = official_loss(
        sd3.transformer,
        sched,
        z_u,
        z_s,
        noise,
        torch.cat([t_unsafe, t_safe, final]),
        c0.sequence.expand(3 * b, -1, -1),
        c0.pooled.expand(3 * b, -1),
        module.beta,
        module.lambda_,
    )
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-7), (float(ours), float(ref))


def test_one_optimiser_step_equals_the_official_step(sd3):
    twin = copy.deepcopy(sd3.transformer)
    before = {n: p.detach().clone() for n, p in twin.named_parameters() if p.requires_grad}
    z_u, z_s, noise, t, sched = _draw(sd3, 1, seed=3)
    module = _module(sd3, n=1)
    c0 = sd3.condition_prompts([""], text_length=77)
    opt = module.configure_optimizers()
    opt.zero_grad()
    module.objective(torch.cat([z_s, z_u]), noise, t, c0.expand(3))["loss"].backward()
    torch.nn.utils.clip_grad_norm_([p for p in sd3.transformer.parameters() if p.requires_grad], 1.0)
    opt.step()

    params = [p for p in twin.parameters() if p.requires_grad]
    official = torch.optim.AdamW(params, lr=6e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    final = sched.timesteps[999].repeat(1)
    loss = official_loss(
        twin,
        sched,
        z_u,
        z_s,
        noise,
        torch.cat([t[1:], t[:1], final]),
        c0.sequence.expand(3, -1, -1),
        c0.pooled.expand(3, -1),
        module.beta,
        module.lambda_,
    )
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    official.step()
    ours = dict(sd3.transformer.named_parameters())
    for n, p in twin.named_parameters():
        if p.requires_grad:
            assert torch.allclose(ours[n], p, rtol=0, atol=1e-9), n
    moved = [n for n, p in twin.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved  # the step changed the LoRA weights


def test_the_timestep_window_is_the_high_noise_part():
    comps = build_tiny_sd3(seed=0, resolution=16, t5=False)
    sched = comps.training_scheduler()
    t = comps.training_timesteps(sched, 4000, 1, 750, torch.Generator().manual_seed(0))
    sigma = comps.sigmas_at(sched, t, torch.zeros(4000, 1))
    assert float(sigma.min()) > 0.5 and float(sigma.max()) <= 1.0  # shift 3: indices 1..749
    assert float(comps.sigmas_at(sched, comps.final_timestep(sched).reshape(1), torch.zeros(1, 1))) < 0.01


def test_training_writes_an_sd3_lora_file_that_loads_back(tmp_path):
    from safetensors import safe_open

    comps = build_tiny_sd3(seed=0, resolution=16, t5=False)
    cfg = compose(["model=tiny_sd3", "checkpoint=duo_sd3"], hydra=False)
    ck = dict(cfg.checkpoint)
    from unlearn_exp.hashing import to_plain
    from unlearn_exp.unlearning.duo import TRAIN_KEYS

    hp = {k: to_plain(ck[k]) for k in TRAIN_KEYS}
    hp.update(beta=500.0, steps=2, batch=2, rank=4, alpha=4, train_resolution=16, precision="32-true")
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    info = train_adapter(
        comps,
        (images, -images),
        hp,
        adapter_name="duo_Nudity",
        work_dir=tmp_path / "w",
        out_dir=tmp_path / "o",
    )
    assert info["lr"] == pytest.approx(3e-5 * 100 / 500) and info["lambda"] == pytest.approx(1e6 * 5)
    f = tmp_path / "o" / "pytorch_lora_weights.safetensors"
    with safe_open(str(f), framework="pt") as st:
        keys = list(st.keys())
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert any(".attn.to_q.lora_A" in k for k in keys) and not any("add_q_proj" in k for k in keys)
    assert not getattr(comps.transformer, "peft_config", None)  # removed after saving
    load_adapters(comps, [f], ["duo_Nudity"], [1.0])
    assert comps.transformer.active_adapters() == ["duo_Nudity"]
