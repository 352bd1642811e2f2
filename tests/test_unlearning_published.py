"""Published checkpoints that replace a component: a diffusers UNet folder (MACE, SafeGen, ...)
and AdvUnlearn's text encoder; loaded from files in their layout, refused in one line when partial,
mismatched or pickled (docs/methods.md 8.4)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import text_encoder_folder, unet_folder
from unlearn_exp.config import preset
from unlearn_exp.errors import UserError
from unlearn_exp.models import build_tiny
from unlearn_exp.store import ArtifactStore
from unlearn_exp.unlearning import apply_checkpoint


def _apply(method: str, path, tmp_path, **over):
    comps = build_tiny()
    cfg = preset("checkpoint", method, path=str(path), **over)
    return comps, apply_checkpoint(comps, cfg, ArtifactStore(tmp_path / "cache"), task_cfg={})


def test_unet_folder_loads_every_weight_and_is_named_by_content(tmp_path):
    folder = unet_folder(tmp_path / "unet", seed=1)
    comps, info = _apply("unet_folder", folder, tmp_path)
    want = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    got = comps.unet.state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items())
    assert info["method"] == "unet_folder" and info["source"] == "user" and len(info["sha256"]) == 1
    pipeline = tmp_path / "pipeline"  # a whole pipeline's folder: its unet/ is taken
    shutil.copytree(folder, pipeline / "unet")
    assert _apply("unet_folder", pipeline, tmp_path)[1]["id"] == info["id"]
    other = unet_folder(tmp_path / "other", seed=2)
    assert _apply("unet_folder", other, tmp_path)[1]["id"] != info["id"]


def test_unet_folder_refuses_partial_mismatched_and_pickled_folders(tmp_path):
    folder = unet_folder(tmp_path / "unet")
    weights = folder / "diffusion_pytorch_model.safetensors"
    partial = tmp_path / "partial"
    shutil.copytree(folder, partial)
    tensors = load_file(str(weights))
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(partial / weights.name))
    with pytest.raises(UserError, match="lacks 1 of this UNet's weights"):
        _apply("unet_folder", partial, tmp_path)
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    conf = json.loads((other / "config.json").read_text())
    conf["cross_attention_dim"] = 1024
    (other / "config.json").write_text(json.dumps(conf))
    with pytest.raises(UserError, match="another architecture: cross_attention_dim=1024"):
        _apply("unet_folder", other, tmp_path)
    pickled = tmp_path / "pickled"
    shutil.copytree(folder, pickled)
    (pickled / weights.name).rename(pickled / "diffusion_pytorch_model.bin")
    with pytest.raises(UserError, match="only pickle weights"):
        _apply("unet_folder", pickled, tmp_path)
    with pytest.raises(UserError, match="not found"):
        _apply("unet_folder", tmp_path / "absent", tmp_path)
    with pytest.raises(UserError, match="set checkpoint.path"):
        apply_checkpoint(build_tiny(), preset("checkpoint", "unet_folder"), tmp_path, task_cfg={})


def test_advunlearn_text_encoder_replaces_the_models(tmp_path):
    folder = text_encoder_folder(tmp_path / "text_encoder", seed=3)
    before = build_tiny()
    comps, info = _apply("advunlearn", folder, tmp_path)
    prompt = ["a naked cat"]
    assert not torch.allclose(comps.encode_prompts(prompt)[0], before.encode_prompts(prompt)[0])
    for k, v in before.unet.state_dict().items():  # the UNet is the model's own
        assert torch.equal(comps.unet.state_dict()[k], v)
    one_file = tmp_path / "advunlearn.safetensors"  # the same weights as one state-dict file
    save_file(
        {f"text_encoder.{k}": v for k, v in load_file(str(folder / "model.safetensors")).items()},
        str(one_file),
    )
    again, _ = _apply("advunlearn", one_file, tmp_path)
    torch.testing.assert_close(again.encode_prompts(prompt)[0], comps.encode_prompts(prompt)[0])
    assert info["method"] == "advunlearn" and info["files"] == [str(folder / "model.safetensors")]


def test_advunlearn_refuses_partial_and_foreign_text_encoders(tmp_path):
    folder = text_encoder_folder(tmp_path / "text_encoder")
    tensors = load_file(str(folder / "model.safetensors"))
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in tensors.items() if "layers.0." not in k}, str(partial))
    with pytest.raises(UserError, match="lacks .* text-encoder weight"):
        _apply("advunlearn", partial, tmp_path)
    foreign = tmp_path / "foreign.safetensors"
    save_file({**tensors, "vision_model.post_layernorm.weight": torch.ones(4)}, str(foreign))
    with pytest.raises(UserError, match="not in this model's text encoder"):
        _apply("advunlearn", foreign, tmp_path)
    name = next(k for k in tensors if k.endswith("final_layer_norm.weight"))
    wrong = tmp_path / "wrong.safetensors"
    save_file({**tensors, name: torch.ones(tensors[name].shape[0] + 1)}, str(wrong))
    with pytest.raises(UserError, match="shape mismatch"):
        _apply("advunlearn", wrong, tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"\x80\x02")  # a pickle is not read unless allowed
    with pytest.raises(UserError, match="is a pickle file"):
        _apply("advunlearn", tmp_path / "weights.bin", tmp_path)
    (tmp_path / "weights.txt").write_text("weights")
    with pytest.raises(UserError, match="not a weight file"):
        _apply("advunlearn", tmp_path / "weights.txt", tmp_path)
    with pytest.raises(UserError, match="not found"):
        _apply("advunlearn", tmp_path / "absent", tmp_path)


def test_advunlearn_reads_its_published_layouts(tmp_path):
    """AdvUnlearn's hub folders (one ``<concept>_unlearned/`` per concept, saved by transformers 4:
    ``text_model.*`` keys and the position-id buffer) and its training code's ``TextEncoder-<name>.pt``
    (the CLIP model under ``text_encoder.`` beside aliases of the same tensors) load to the same
    encoder as transformers 5's layout."""
    folder = text_encoder_folder(tmp_path / "te", seed=4)
    tensors = load_file(str(folder / "model.safetensors"))
    reference, _ = _apply("advunlearn", folder, tmp_path)
    prompt = ["a naked cat"]
    expected = reference.encode_prompts(prompt)[0]
    n_positions = tensors["embeddings.position_embedding.weight"].shape[0]
    v4 = {f"text_model.{k}": v for k, v in tensors.items()}
    v4["text_model.embeddings.position_ids"] = torch.arange(n_positions)[None]
    hub = tmp_path / "AdvUnlearn"
    for concept in ("nudity", "vangogh"):
        (hub / f"{concept}_unlearned").mkdir(parents=True)
        shutil.copy(folder / "config.json", hub / f"{concept}_unlearned" / "config.json")
        save_file(v4, str(hub / f"{concept}_unlearned" / "model.safetensors"))
    with pytest.raises(UserError, match=r"per concept \(nudity_unlearned, vangogh_unlearned\)"):
        _apply("advunlearn", hub, tmp_path)
    comps, _ = _apply("advunlearn", hub / "nudity_unlearned", tmp_path)
    torch.testing.assert_close(comps.encode_prompts(prompt)[0], expected)

    wrapper = {f"text_encoder.{k}": v for k, v in v4.items()}  # the CLIP model inside the wrapper
    for alias in ("embeddings.", "encoder.", "final_layer_norm."):  # the wrapper's aliases of it
        aliased = {k: v for k, v in tensors.items() if k.startswith(alias)}
        wrapper.update({k.replace("embeddings.", "embedding.", 1): v for k, v in aliased.items()})
    pt = tmp_path / "TextEncoder-nudity.pt"
    torch.save(wrapper, pt)
    with pytest.raises(UserError, match="allow_pickle_conversion"):
        _apply("advunlearn", pt, tmp_path)
    comps, info = _apply("advunlearn", pt, tmp_path, allow_pickle_conversion=True)
    torch.testing.assert_close(comps.encode_prompts(prompt)[0], expected)
    assert info["n_tensors"] == len(tensors)

    bin_folder = tmp_path / "bin_te"  # transformers 4's pickled save_pretrained
    bin_folder.mkdir()
    shutil.copy(folder / "config.json", bin_folder / "config.json")
    torch.save(v4, bin_folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="only pickle weights"):
        _apply("advunlearn", bin_folder, tmp_path)
    comps, _ = _apply("advunlearn", bin_folder, tmp_path, allow_pickle_conversion=True)
    torch.testing.assert_close(comps.encode_prompts(prompt)[0], expected)


def test_unet_folder_reads_pickled_weights_only_when_allowed(tmp_path):
    folder = unet_folder(tmp_path / "unet", seed=2)
    reference, _ = _apply("unet_folder", folder, tmp_path)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(folder / "config.json", pickled / "config.json")
    weights = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    torch.save(weights, pickled / "diffusion_pytorch_model.bin")
    with pytest.raises(UserError, match="allow_pickle_conversion=true"):
        _apply("unet_folder", pickled, tmp_path)
    comps, _ = _apply("unet_folder", pickled, tmp_path, allow_pickle_conversion=True)
    for k, v in reference.unet.state_dict().items():
        assert torch.equal(comps.unet.state_dict()[k], v)


def test_rece_whole_unet_pt_loads_as_esd(tmp_path):
    """RECE's training saves ``unet.state_dict()`` of a diffusers pipeline as ``<rate>-<epoch>.pt``
    (docs/methods.md 8.4): it loads as ``checkpoint=esd`` with pickle conversion, every weight."""
    folder = unet_folder(tmp_path / "unet", seed=5)
    weights = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    pt = tmp_path / "0.0000-2.pt"
    torch.save(weights, pt)
    comps, info = _apply("esd", pt, tmp_path, allow_pickle_conversion=True)
    assert all(torch.equal(comps.unet.state_dict()[k], v) for k, v in weights.items())
    assert info["method"] == "esd"


def test_on_sd3_the_transformer_folder_and_advunlearn_clip_l_load(tmp_path):
    from unlearn_exp.models import build_tiny_sd3

    def apply_sd3(method, path):
        comps = build_tiny_sd3(seed=0)
        cfg = preset("checkpoint", method, path=str(path))
        return comps, apply_checkpoint(comps, cfg, ArtifactStore(tmp_path / "cache"), task_cfg={})

    # a pipeline folder's transformer/ replaces the transformer, weight for weight
    folder = unet_folder(tmp_path / "pipe" / "transformer", seed=1, family="sd3")
    comps, info = apply_sd3("unet_folder", tmp_path / "pipe")
    want = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    assert want.keys() == comps.transformer.state_dict().keys()
    assert all(torch.equal(comps.transformer.state_dict()[k], v) for k, v in want.items())
    assert info["method"] == "unet_folder"
    conf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**conf, "num_layers": 2}))
    with pytest.raises(UserError, match="transformer is another architecture: num_layers=2"):
        apply_sd3("unet_folder", folder)
    with pytest.raises(UserError, match="another architecture"):  # an SD v1 UNet is not SD3's
        apply_sd3("unet_folder", unet_folder(tmp_path / "unet", seed=1))

    # AdvUnlearn's CLIPTextModel replaces CLIP-L's tower; SD3's projection, CLIP-G and T5 stay
    te = text_encoder_folder(tmp_path / "adv", seed=3, family="sd3")
    original = build_tiny_sd3(seed=0)
    comps, info = apply_sd3("advunlearn", te)
    tower = load_file(str(te / "model.safetensors"))
    got = comps.text_encoder.state_dict()
    assert all(torch.equal(got["text_model." + k.removeprefix("text_model.")], v) for k, v in tower.items())
    torch.testing.assert_close(
        got["text_projection.weight"], original.text_encoder.state_dict()["text_projection.weight"]
    )
    for name in ("text_encoder_2", "text_encoder_3"):
        mine, theirs = getattr(comps, name).state_dict(), getattr(original, name).state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    with pytest.raises(UserError, match="shape mismatch"):  # SD v1's tiny encoder is 32 wide, CLIP-L here 16
        apply_sd3("advunlearn", text_encoder_folder(tmp_path / "adv_sd1", seed=3))
