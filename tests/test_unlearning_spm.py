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
    with pytest.raises(UserError, match="set checkpoint.path"):
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
