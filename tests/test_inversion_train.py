"""Concept inversion training: frozen rows, K vectors, outputs, resume and divergence (docs/methods.md 6)."""

import json
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from unlearn_exp.config import preset
from unlearn_exp.errors import UserError
from unlearn_exp.inversion.concept_inversion import invert
from unlearn_exp.inversion.config import InversionConfig
from unlearn_exp.inversion.textual_inversion import token_ids
from unlearn_exp.models import build_tiny

CFG = preset(
    "inversion", "default", init_word="dog", steps=6, lr=5e-2, batch_size=2, checkpoint_every=3, eval_draws=2
)


def _images(n=3, res=16):
    return torch.rand(n, 3, res, res, generator=torch.Generator().manual_seed(3)) * 2 - 1


@pytest.mark.slow
def test_only_placeholder_rows_change_with_three_vectors(tmp_path):
    comps = build_tiny(resolution=16)
    before = comps.text_encoder.get_input_embeddings().weight.clone()
    unet_before = {k: v.clone() for k, v in comps.unet.state_dict().items()}
    out = invert(comps, _images(), {**CFG, "num_vectors": 3}, tmp_path / "out", progress=False)
    assert out["tokens"] == ["<c*>", "<c*>_1", "<c*>_2"] and out["steps"] == 6
    table = comps.text_encoder.get_input_embeddings()
    assert type(table) is torch.nn.Embedding  # the wrapper is gone after training
    assert torch.equal(table.weight[: before.shape[0]], before)
    ids = token_ids(comps, out["tokens"])
    dog = comps.tokenizer("dog", add_special_tokens=False).input_ids[0]
    assert all(not torch.equal(table.weight[i], before[dog]) for i in ids)
    assert all(torch.equal(v, unet_before[k]) for k, v in comps.unet.state_dict().items())

    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    for key in ("source", "image_set", "steps", "final_loss", "best_loss", "wall_s"):
        assert meta[key] is not None, key
    assert meta["best_loss"] <= meta["final_loss"]
    # the checkpoint holds the trainable rows only, not the frozen model
    ckpt = torch.load(tmp_path / "out" / "checkpoints" / "last.ckpt", weights_only=False)
    assert [v.shape for v in ckpt["state_dict"].values()] == [torch.Size([3, comps.text_dim])]

    pipe = build_tiny(resolution=16).to_diffusers()
    pipe.load_textual_inversion(out["embeds_path"])
    ids_d = pipe.tokenizer.convert_tokens_to_ids(out["tokens"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids_d], table.weight[ids])


class _Interrupt(L.Callback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated kill")


@pytest.mark.slow
def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path):
    cfg = {**CFG, "steps": 8}
    full = build_tiny(resolution=16)
    invert(full, _images(), cfg, tmp_path / "full", progress=False)
    ids = token_ids(full, ["<c*>"])
    expected = full.text_encoder.get_input_embeddings().weight[ids]

    work = tmp_path / "work"
    with pytest.raises(RuntimeError, match="simulated kill"):
        invert(
            build_tiny(resolution=16),
            _images(),
            cfg,
            tmp_path / "a",
            ckpt_dir=work,
            progress=False,
            callbacks=[_Interrupt(5)],
        )
    assert not (tmp_path / "a" / "learned_embeds.safetensors").exists()
    resumed = build_tiny(resolution=16)
    meta = invert(resumed, _images(), cfg, tmp_path / "b", ckpt_dir=work, progress=False)
    assert meta["resumed_from_step"] == 3 and meta["steps"] == 8
    got = resumed.text_encoder.get_input_embeddings().weight[ids]
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    assert not torch.equal(
        got,
        build_tiny(resolution=16)
        .text_encoder.get_input_embeddings()
        .weight[resumed.tokenizer("dog", add_special_tokens=False).input_ids],
    )

    # a checkpoint from another run (other images) is refused, not silently resumed
    with pytest.raises(UserError, match="different inversion run"):
        invert(build_tiny(resolution=16), _images(n=2), cfg, tmp_path / "c", ckpt_dir=work, progress=False)


class _Poison(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2:
            pl_module.embedding.learned.data.fill_(float("nan"))


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_rows(tmp_path):
    comps = build_tiny(resolution=16)
    with pytest.raises(UserError, match="stopped at step 2: the loss is non-finite") as info:
        invert(comps, _images(), CFG, tmp_path / "out", progress=False, callbacks=[_Poison()])
    assert "last_good_embeds.safetensors" in str(info.value)
    assert not (tmp_path / "out" / "learned_embeds.safetensors").exists()
    assert not (tmp_path / "out" / "metadata.json").exists()
    table = comps.text_encoder.get_input_embeddings()
    assert type(table) is torch.nn.Embedding and torch.isfinite(table.weight).all()
    assert (tmp_path / "out" / "checkpoints" / "last_good_embeds.safetensors").is_file()


def test_settings_reject_bad_values():
    with pytest.raises(UserError, match="template"):
        InversionConfig.from_cfg({**CFG, "template": "no placeholder"})
    with pytest.raises(UserError, match="lr_schedule"):
        InversionConfig.from_cfg({**CFG, "lr_schedule": "cosine"})
    with pytest.raises(UserError, match="InversionConfig needs inversion.steps"):
        InversionConfig.from_cfg({k: v for k, v in CFG.items() if k != "steps"})
    s = InversionConfig.from_cfg({**CFG, "template": ["a photo of {}", "{}"], "betas": [0.9, 0.99]})
    assert s.templates == ["a photo of {}", "{}"] and s.as_dict()["betas"] == [0.9, 0.99]


@pytest.mark.parametrize(
    ("prompt_tokens", "trained"), [("all", [True, True, True]), ("first", [True, False, False])]
)
def test_prompt_tokens_decides_which_of_the_vectors_train(tmp_path, prompt_tokens, trained):
    """``prompt_tokens: first`` (CCE, diffusers' example) puts only ``<c*>`` in the training prompts: its
    row trains, the other K-1 stay at the initialiser's row; ``all`` (the default) trains every row."""
    comps = build_tiny(resolution=16)
    dog = (
        comps.text_encoder.get_input_embeddings()
        .weight[comps.tokenizer("dog", add_special_tokens=False).input_ids[0]]
        .clone()
    )
    cfg = {**CFG, "num_vectors": 3, "prompt_tokens": prompt_tokens, "steps": 2, "eval_draws": 0}
    out = invert(comps, _images(), cfg, tmp_path / "out", progress=False)
    rows = comps.text_encoder.get_input_embeddings().weight[token_ids(comps, out["tokens"])]
    assert [not torch.equal(r, dog) for r in rows] == trained
    assert out["prompt"] == "<c*> <c*>_1 <c*>_2"  # the concept is prompted with all K either way


def test_prompt_tokens_all_leaves_every_key_as_it_was():
    """The option's default is left out of C*'s key, its run key and the cell spec; ``first`` is in them."""
    from tests.helpers import compose
    from unlearn_exp.cell.keys import inversion_key
    from unlearn_exp.hashing import config_hash, to_plain
    from unlearn_exp.identity import cell_spec, without_neutral

    base = ["+experiment=toy_duo", "embedding=inverted", "guidance=sld", "checkpoint.beta=500"]
    default, first = (
        compose(base, hydra=False),
        compose([*base, "inversion.prompt_tokens=first"], hydra=False),
    )
    assert default.inversion.prompt_tokens == "all"
    settings = InversionConfig.from_cfg(default.inversion).as_dict()
    assert "prompt_tokens" not in without_neutral("inversion", settings)
    assert "prompt_tokens" in without_neutral(
        "inversion", InversionConfig.from_cfg(first.inversion).as_dict()
    )
    keys = [config_hash(inversion_key(c, "m", "i", "c")) for c in (default, first)]
    specs = [cell_spec(c)["concept"]["inversion"] for c in (default, first)]
    assert keys[0] != keys[1] and "prompt_tokens" not in specs[0] and specs[1]["prompt_tokens"] == "first"
    legacy = to_plain(default.inversion)
    del legacy["prompt_tokens"]  # a config from before the option: the same key
    assert config_hash(inversion_key(SimpleNamespace(inversion=legacy), "m", "i", "c")) == keys[0]
