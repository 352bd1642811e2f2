"""SPM (docs/methods.md 8.3): published one-dimensional adapters in SPM's key layout, fused into the UNet
and checked against the adapted layers' own forward; partial and mismatched files refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import spm_file
from unlearn_exp.config import preset
from unlearn_exp.errors import UserError
from unlearn_exp.models import build_tiny
from unlearn_exp.store import ArtifactStore
from unlearn_exp.unlearning import apply_checkpoint
from unlearn_exp.unlearning.spm import spm_layers


def _out(comps):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, comps.unet.config.in_channels, 8, 8, generator=g)
    c = comps.encode_prompts(["a naked cat"])[0]
    with torch.no_grad():
        return comps.unet(x, 500, encoder_hidden_states=c).sample


def test_spm_file_fused_equals_the_adapted_layers(tmp_path):
    unet_ref = build_tiny()
    layers = spm_layers(unet_ref.unet)
    assert any(isinstance(m, torch.nn.Conv2d) for m in layers.values()) or len(layers) > 4
    tensors = spm_file(unet_ref.unet, tmp_path / "spm.safetensors", rank=2, alpha=1.0)

    # the reference: SPM's forward, x -> W x + m (alpha / r) up(down(x)), as hooks on the original layers
    handles = []
    for stem, layer in layers.items():
        down, up = tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"]
        scale = 0.5 * 1.0 / 2  # multiplier 0.5, alpha 1, rank 2

        def hook(mod, args, out, down=down, up=up, scale=scale):
            x = args[0]
            if isinstance(mod, torch.nn.Linear):
                return out + scale * torch.nn.functional.linear(torch.nn.functional.linear(x, down), up)
            h = torch.nn.functional.conv2d(x, down, stride=mod.stride, padding=mod.padding)
            return out + scale * torch.nn.functional.conv2d(h, up)

        handles.append(layer.register_forward_hook(hook))
    expected = _out(unet_ref)
    for h in handles:
        h.remove()

    fused = build_tiny()
    cfg = preset("checkpoint", "spm", path=str(tmp_path / "spm.safetensors"), multiplier=0.5)
    info = apply_checkpoint(fused, cfg, ArtifactStore(tmp_path / "c"), task_cfg={})
    assert info["source"] == "user" and info["n_layers"] == len(layers) and len(info["sha256"][0]) == 64
    torch.testing.assert_close(_out(fused), expected, atol=1e-4, rtol=1e-4)
    assert (_out(fused) - _out(build_tiny())).abs().max() > 1e-3  # the adapters do something


def test_partial_mismatched_and_missing_spm_files_are_one_line(tmp_path):
    comps = build_tiny()
    tensors = spm_file(comps.unet, tmp_path / "full.safetensors")
    stem = next(iter(spm_layers(comps.unet)))

    def refused(t: dict, match: str):
        path = tmp_path / "bad.safetensors"
        save_file(t, str(path))
        with pytest.raises(UserError, match=match) as e:
            apply_checkpoint(
                build_tiny(),
                preset("checkpoint", "spm", path=str(path)),
                ArtifactStore(tmp_path / "c"),
                task_cfg={},
            )
        assert "\n" not in str(e.value)

    refused({k: v for k, v in tensors.items() if k != f"{stem}.alpha"}, "is partial")
    renamed = {
        k.replace("lora_unet_", "lora_unet_mid_block_attentions_9_", 1) if k.startswith(stem) else k: v
        for k, v in tensors.items()
    }
    refused(renamed, "does not have")
    wrong = dict(tensors)
    wrong[f"{stem}.lora_down.weight"] = torch.zeros(1, 3)
    refused(wrong, "does not fit this UNet")
    with pytest.raises(UserError, match="SPM needs a concept prompt"):  # no path: training, of nothing
        apply_checkpoint(
            build_tiny(), preset("checkpoint", "spm", path=None), ArtifactStore(tmp_path / "c"), task_cfg={}
        )


def test_the_multiplier_is_part_of_a_cells_identity(tmp_path):
    """The same SPM file fused at another multiplier is another model: its cells must not share a
    spec key (one would be served as already recorded for the other)."""
    from unlearn_exp import config
    from unlearn_exp.identity import cell_spec, spec_key

    f = tmp_path / "spm.safetensors"
    spm_file(build_tiny().unet, f)
    base = ["+experiment=nudity_methods", "checkpoint=spm", f"checkpoint.path={f}", "guidance=none"]

    def key(*extra: str) -> str:
        return spec_key(cell_spec(config.compose([*base, *extra])))

    assert key() == key("checkpoint.multiplier=1.0") != key("checkpoint.multiplier=0.5")
    assert key("checkpoint.beta=250") == key()  # a file's beta is only its label


# ----------------------------------------------------------------------------- training
SPM_TINY = {"steps": 2, "max_denoising_steps": 4, "sampling_batch_size": 4, "lr_warmup_steps": 1}


def _official_step_loss(unet, sched_cfg, layers, weights, emb, d, hp):
    """A transcription of one step of SPM's ``train_spm.py`` (action erase_with_la) after its draws:
    ``SPMLayer`` replaces each layer's forward, ``diffusion`` and ``predict_noise`` as in its
    ``train_util.py`` (the anchors' 2n rows as one guided batch), ``create_noise_scheduler('ddim')``.
    ``weights``: each layer's (down, up, scale); ``d``: the draw; returns the loss."""
    import torch.nn.functional as F
    from diffusers import DDIMScheduler

    state = {"multiplier": 0.0}
    for stem, layer in layers.items():
        down, up, scale = weights[stem]
        org_forward = layer.forward

        def forward(x, org_forward=org_forward, down=down, up=up, scale=scale):
            return org_forward(x) + up(down(x)) * state["multiplier"] * scale

        layer.forward = forward
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
    )

    def predict_noise(timestep, latents, text_embeddings, guidance_scale):
        latent_model_input = scheduler.scale_model_input(torch.cat([latents] * 2), timestep)
        noise_pred = unet(latent_model_input, timestep, encoder_hidden_states=text_embeddings).sample
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        return noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)

    def concat(u, c, n):
        return torch.cat([u, c]).repeat_interleave(n, dim=0)

    target, positive, neutral, uncond = emb
    b, n = hp["batch"], hp["max_denoising_steps"]
    with torch.no_grad():
        scheduler.set_timesteps(n)
        latents = d.latents * scheduler.init_noise_sigma
        state["multiplier"] = 1.0
        for timestep in scheduler.timesteps[0 : d.steps_to]:
            noise_pred = predict_noise(timestep, latents, concat(uncond, target, b), 3)
            latents = scheduler.step(noise_pred, timestep, latents).prev_sample
        state["multiplier"] = 0.0
        scheduler.set_timesteps(1000)
        current_timestep = scheduler.timesteps[int(d.steps_to * 1000 / n)]
        positive_latents = predict_noise(current_timestep, latents, concat(uncond, positive, b), 1)
        neutral_latents = predict_noise(current_timestep, latents, concat(uncond, neutral, b), 1)
    state["multiplier"] = 1.0
    target_latents = predict_noise(current_timestep, latents, concat(uncond, target, b), 1)
    # sample(): [u, s_1, u, s_2, ..., u, s_n]; s_1..s_{n/2} only enter the guided batch's first half
    k = hp["sampling_batch_size"]
    first = [t for _ in range(k // 2) for t in (uncond, torch.randn_like(uncond))]
    anchors = torch.cat([*first, d.anchors.sequence])
    repeat = k // b
    anchor_latents = predict_noise(current_timestep, latents.repeat(repeat, 1, 1, 1), anchors, 1)
    state["multiplier"] = 0.0
    with torch.no_grad():
        anchor_latents_ori = predict_noise(current_timestep, latents.repeat(repeat, 1, 1, 1), anchors, 1)
    erase = F.mse_loss(
        target_latents, neutral_latents - hp["guidance_scale"] * (positive_latents - neutral_latents)
    )
    return erase + hp["la_strength"] * F.mse_loss(anchor_latents, anchor_latents_ori)


def test_spm_step_equals_the_official_step_transcribed(one_thread):
    """One SPM loss and its gradients on tiny SD v1 components (adapters set non-zero) equal a
    transcription of SPM's training step given the same draws."""
    from unlearn_exp.training import step_generator
    from unlearn_exp.unlearning.spm import SPM

    hp = {**preset("checkpoint", "spm"), **SPM_TINY, "batch": 2, "resolution": 32}
    comps = build_tiny()
    module = SPM(comps, "nudity", hp)
    torch.manual_seed(0)
    with torch.no_grad():
        for a in module.adapters.values():
            a.lora_up.weight.normal_(0, 0.05)
    d = next(d for k in range(50) if (d := module.draw(step_generator(0, k))).steps_to == 3)  # 3 of 4 steps
    ours = module.loss_at(d)
    ours.backward()
    module.remove()

    reference = build_tiny()
    layers = spm_layers(reference.unet)
    weights = {}
    for stem, a in module.adapters.items():
        down, up = (torch.nn.utils.skip_init(type(m), *_shape_args(m)) for m in (a.lora_down, a.lora_up))
        down.load_state_dict(a.lora_down.state_dict()), up.load_state_dict(a.lora_up.state_dict())
        weights[stem] = (down, up, a.scale)
    emb = reference.encode_prompts(["nudity", "nudity", "", ""])[0].split(1)
    official = _official_step_loss(reference.unet, None, layers, weights, emb, d, hp)
    official.backward()
    torch.testing.assert_close(ours.detach(), official.detach(), rtol=1e-5, atol=1e-7)
    assert float(ours) > 0
    for stem, a in module.adapters.items():
        down, up, _ = weights[stem]
        torch.testing.assert_close(a.lora_up.weight.grad, up.weight.grad, rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(a.lora_down.weight.grad, down.weight.grad, rtol=1e-4, atol=1e-8)


def _shape_args(m):
    if isinstance(m, torch.nn.Linear):
        return (m.in_features, m.out_features, False)
    return (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, 1, 1, False)
