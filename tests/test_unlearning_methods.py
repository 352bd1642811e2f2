"""DUO pair data (docs/methods.md 5.1), UCE (8.2), ESD (8.1) and loading published UNet weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from unlearn_exp.config import preset
from unlearn_exp.errors import UserError
from unlearn_exp.models import build_tiny
from unlearn_exp.store import ArtifactStore
from unlearn_exp.unlearning import apply_checkpoint, build_pair_set, load_pair_set
from unlearn_exp.unlearning.pairs import pair_prompts
from unlearn_exp.unlearning.uce import cross_attention_projections, last_token_embeddings, uce_edit

pytestmark = pytest.mark.usefixtures("one_thread")


class ParityJudge:
    """A deterministic stand-in judge: an image is unsafe when its pixel sum is divisible by 3."""

    name = "parity"

    def __init__(self):
        self.calls = 0

    def judge(self, pil):
        self.calls += len(pil)
        return [{"safe": int(np.asarray(im, dtype=np.int64).sum()) % 3 != 0, "score": 0.5} for im in pil]


class AlwaysSafe:
    name = "always_safe"

    def judge(self, pil):
        return [{"safe": True, "labels": []} for _ in pil]


RECIPE = {
    "name": "Toy",
    "unsafe_prompts": ["a naked cat", "a naked dog"],
    "safe_prompts": ["a dressed cat", "a dressed dog"],
    "n_pairs": 4,
    "strength": 0.75,
    "max_tries": 30,
    "seed": 1,
}
FAST = {"scheduler": "ddim", "steps": 2}


def test_pair_prompts_are_consecutive_blocks():
    assert (
        pair_prompts(RECIPE)
        == [("a naked cat", "a dressed cat")] * 2 + [("a naked dog", "a dressed dog")] * 2
    )
    with pytest.raises(UserError, match="equal length"):
        pair_prompts({**RECIPE, "safe_prompts": ["x"]})


@pytest.mark.slow
def test_pair_set_keeps_only_judge_accepted_images(tmp_path):
    judge = ParityJudge()
    comps = build_tiny()
    ps = build_pair_set(comps, RECIPE, judge, tmp_path / "pairs", FAST)
    again = load_pair_set(tmp_path / "pairs")
    assert len(ps) == len(again) == 4
    unsafe, safe = again.images()
    assert unsafe.shape == safe.shape == (4, 3, 32, 32)
    from unlearn_exp.sampling import to_pil

    assert [v["safe"] for v in judge.judge(to_pil(unsafe))] == [False] * 4
    assert [v["safe"] for v in judge.judge(to_pil(safe))] == [True] * 4
    tries = [r["tries"]["unsafe"] for r in again.records]
    assert sum(tries) > 4  # the judge rejected some unsafe tries, which were re-sampled
    assert [r["unsafe_prompt"] for r in again.records][-1] == "a naked dog"
    # reproducible: the same recipe gives the same images
    ps2 = build_pair_set(build_tiny(), RECIPE, ParityJudge(), tmp_path / "pairs2", FAST)
    assert torch.equal(ps2.images()[0], unsafe)


def test_pair_set_stops_when_the_judge_accepts_nothing(tmp_path):
    with pytest.raises(
        UserError, match=r"4 of 4 unsafe images .* max_tries=3 \(12 tries failed.*found every try safe"
    ):
        build_pair_set(build_tiny(), {**RECIPE, "max_tries": 3}, AlwaysSafe(), tmp_path / "p", FAST)
    assert not (tmp_path / "p" / "pairs.json").exists()
    with pytest.raises(UserError, match="no judge was given"):
        build_pair_set(build_tiny(), RECIPE, None, tmp_path / "p", FAST)


# ----------------------------------------------------------------------------- UCE
def test_uce_weights_satisfy_the_normal_equations(tmp_path):
    comps = build_tiny()
    recipe = {
        "erase": ["nudity", "gore"],
        "guide": "",
        "preserve": ["a cat"],
        "lamb": 0.5,
        "erase_scale": 1.0,
        "preserve_scale": 0.7,
        "templates": [],
    }
    old = {
        n + ".weight": m.weight.detach().clone() for n, m in cross_attention_projections(comps.unet).items()
    }
    edited = uce_edit(comps, recipe)
    assert edited.keys() == old.keys() and len(old) >= 4
    c_e = last_token_embeddings(comps, recipe["erase"]).double()
    c_g = last_token_embeddings(comps, ["", ""]).double()
    c_p = last_token_embeddings(comps, recipe["preserve"]).double()
    d = c_e.shape[1]
    for k, W_old in old.items():
        W_old, W_new = W_old.double(), edited[k].double()
        v_star = c_g @ W_old.T
        lhs = W_new @ (0.5 * torch.eye(d, dtype=torch.float64) + c_e.T @ c_e + 0.7 * c_p.T @ c_p)
        rhs = 0.5 * W_old + v_star.T @ c_e + 0.7 * (c_p @ W_old.T).T @ c_p
        assert torch.allclose(lhs, rhs, atol=1e-4), k
        assert not torch.allclose(W_new, W_old, atol=1e-3)
    # the erased concept's key/value now lies closer to the guide's than before
    k0 = next(iter(old))
    before = (c_e @ old[k0].double().T - c_g @ old[k0].double().T).norm()
    after = (c_e @ edited[k0].double().T - c_g @ old[k0].double().T).norm()
    assert after < before
    # through apply_checkpoint: cached, applied in place, reloadable as a published file
    store = ArtifactStore(tmp_path / "store")
    cfg = {
        **preset("checkpoint", "uce"),
        "erase": {"nudity": ["nudity", "gore"]},
        "preserve": ["a cat"],
        "preserve_scale": 0.7,
    }
    target = build_tiny()
    info = apply_checkpoint(target, cfg, store, task_cfg={"name": "nudity"})
    assert info["method"] == "uce" and info["erase"] == ["nudity", "gore"]
    sd = target.unet.state_dict()
    assert all(torch.allclose(sd[k], v, atol=1e-5) for k, v in edited.items())
    published = build_tiny()
    apply_checkpoint(
        published, preset("checkpoint", "uce", path=info["files"][0]), store, task_cfg={"name": "nudity"}
    )
    assert torch.equal(published.unet.state_dict()[k0], sd[k0])


# ----------------------------------------------------------------------------- ESD
ESD_HP = preset(
    "checkpoint",
    "esd",
    variant="esd-x",
    lr=1e-3,
    eta=1.0,
    start_guidance=3.0,
    ddim_steps=4,
    steps=8,
    seed=0,
    checkpoint_every=3,
)


@pytest.mark.slow
def test_esd_moves_concept_prediction_toward_negatively_guided_target(tmp_path):
    from unlearn_exp.unlearning.esd import ESD, train_esd

    comps = build_tiny()
    orig = {k: v.clone() for k, v in comps.unet.state_dict().items()}
    probe = ESD(build_tiny(), "nudity", variant="esd-x", n_ddim=4, seed=5)
    draws = [probe.draw(torch.Generator().manual_seed(i)) for i in range(6)]

    def target_gap(unet):
        with torch.no_grad():
            probe.unet = unet  # the trainable side; the frozen side stays the original tiny model
            return sum(float(probe.loss_at(x, t)) for x, t in draws) / len(draws)

    gap_before = target_gap(comps.unet)
    info = train_esd(comps, "nudity", ESD_HP, work_dir=tmp_path / "w", out_dir=tmp_path / "o")
    gap_after = target_gap(comps.unet)
    assert info["steps"] == 8
    assert gap_after < 0.6 * gap_before
    changed = [k for k, v in comps.unet.state_dict().items() if not torch.equal(v, orig[k])]
    assert changed and all(".attn2." in k for k in changed)  # esd-x: cross-attention only
    saved = load_file(str(tmp_path / "o" / "esd_unet.safetensors"))
    assert set(changed) <= set(saved) and all(".attn2." in k for k in saved)


@pytest.mark.slow
def test_checkpoint_esd_caches_and_loads_published_weights(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    cfg = {"method": "esd", **ESD_HP, "steps": 2, "concept": {"violence": "violence"}}
    trained = build_tiny()
    info = apply_checkpoint(trained, cfg, store, task_cfg={"name": "violence"})
    assert info["concept"] == "violence" and info["source"] == "trained"
    again = build_tiny()
    info2 = apply_checkpoint(again, cfg, ArtifactStore(tmp_path / "store"), task_cfg={"name": "violence"})
    assert info2["id"] == info["id"]
    a, b = trained.unet.state_dict(), again.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    # published: a partial state dict with "unet." prefixes, and the same as a pickle (opt-in only)
    partial = {"unet." + k: v for k, v in load_file(info["files"][0]).items()}
    save_file(partial, str(tmp_path / "esd.safetensors"))
    user = build_tiny()
    apply_checkpoint(
        user, preset("checkpoint", "esd", path=str(tmp_path / "esd.safetensors")), store, task_cfg={}
    )
    assert all(torch.equal(user.unet.state_dict()[k], a[k]) for k in a)
    torch.save({"state_dict": partial}, tmp_path / "esd.ckpt")
    with pytest.raises(UserError, match="allow_pickle_conversion"):
        apply_checkpoint(
            build_tiny(), preset("checkpoint", "esd", path=str(tmp_path / "esd.ckpt")), store, task_cfg={}
        )
    conv = apply_checkpoint(
        build_tiny(),
        preset("checkpoint", "esd", path=str(tmp_path / "esd.ckpt"), allow_pickle_conversion=True),
        store,
        task_cfg={},
    )
    assert conv["files"][0].endswith("esd.safetensors") and "converted" in conv["files"][0]


def _to_ldm(unet) -> dict[str, torch.Tensor]:
    """A diffusers UNet's state dict under CompVis/LDM names (``model.diffusion_model.*``), written
    from the LDM layout: L resnets per down block plus a downsampler, L+1 per up block."""
    cfg = unet.config
    per = cfg.layers_per_block + 1
    n = len(cfg.block_out_channels)
    prefixes = [
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
        ("mid_block.attentions.0.", "middle_block.1."),
        ("mid_block.resnets.0.", "middle_block.0."),
        ("mid_block.resnets.1.", "middle_block.2."),
    ]
    for i in range(n):
        for j in range(cfg.layers_per_block):
            prefixes += [
                (f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{per * i + j + 1}.0."),
                (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{per * i + j + 1}.1."),
            ]
        prefixes.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{per * (i + 1)}.0.op."))
        has_attn = "CrossAttn" in cfg.up_block_types[i]
        for j in range(per):
            prefixes += [
                (f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{per * i + j}.0."),
                (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{per * i + j}.1."),
            ]
        prefixes.append(
            (f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{per * i + per - 1}.{2 if has_attn else 1}.")
        )
    resnet = [
        ("norm1.", "in_layers.0."),
        ("conv1.", "in_layers.2."),
        ("time_emb_proj.", "emb_layers.1."),
        ("norm2.", "out_layers.0."),
        ("conv2.", "out_layers.3."),
        ("conv_shortcut.", "skip_connection."),
    ]
    out = {}
    for key, value in unet.state_dict().items():
        for ours, theirs in prefixes:
            if key.startswith(ours):
                rest = key[len(ours) :]
                if ".resnets." in ours:
                    for a, b in resnet:
                        if rest.startswith(a):
                            rest = b + rest[len(a) :]
                out["model.diffusion_model." + theirs + rest] = value.clone()
                break
        else:
            raise AssertionError(f"no LDM name for {key}")
    return out


def test_ldm_format_checkpoint_loads_into_the_unet(tmp_path):
    """A full CompVis/LDM checkpoint (``model.diffusion_model.*`` beside the text encoder and VAE, as
    ESD's original releases) converts through diffusers' converter onto our UNet names."""
    torch.manual_seed(0)
    source = build_tiny(seed=1)
    ldm = _to_ldm(source.unet)
    ldm["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.ones(4)
    ldm["first_stage_model.decoder.conv_out.bias"] = torch.zeros(3)
    torch.save({"state_dict": ldm}, tmp_path / "esd_compvis.ckpt")
    user = build_tiny(seed=0)
    assert not all(torch.equal(user.unet.state_dict()[k], v) for k, v in source.unet.state_dict().items())
    apply_checkpoint(
        user,
        preset("checkpoint", "esd", path=str(tmp_path / "esd_compvis.ckpt"), allow_pickle_conversion=True),
        ArtifactStore(tmp_path / "s"),
        task_cfg={},
    )
    want = source.unet.state_dict()
    assert all(torch.equal(user.unet.state_dict()[k], want[k]) for k in want)

    partial = {k: v for k, v in ldm.items() if "attn2" in k}  # not a whole UNet: refused in one line
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(UserError, match="must be complete") as err:
        apply_checkpoint(
            build_tiny(),
            preset("checkpoint", "esd", path=str(tmp_path / "partial.safetensors")),
            ArtifactStore(tmp_path / "s"),
            task_cfg={},
        )
    assert "\n" not in str(err.value)


def test_wrong_unet_weights_are_refused_with_the_offending_keys(tmp_path):
    store = ArtifactStore(tmp_path / "s")
    k = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    save_file({k: torch.zeros(3, 3)}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(UserError, match=r"shape mismatch.*attn2\.to_k\.weight \(3, 3\)"):
        apply_checkpoint(
            build_tiny(),
            preset("checkpoint", "esd", path=str(tmp_path / "shape.safetensors")),
            store,
            task_cfg={},
        )
    save_file({"input_blocks.1.1.proj_in.weight": torch.zeros(3)}, str(tmp_path / "keys.safetensors"))
    with pytest.raises(UserError, match=r"not in this model's UNet \(input_blocks\.1\.1\.proj_in\.weight\)"):
        apply_checkpoint(
            build_tiny(),
            preset("checkpoint", "esd", path=str(tmp_path / "keys.safetensors")),
            store,
            task_cfg={},
        )
    save_file({"conv_in.weight": torch.zeros(32, 4, 3, 3)}, str(tmp_path / "uce.safetensors"))
    with pytest.raises(UserError, match="not attn2.to_k/attn2.to_v weights"):
        apply_checkpoint(
            build_tiny(),
            preset("checkpoint", "uce", path=str(tmp_path / "uce.safetensors")),
            store,
            task_cfg={},
        )
    with pytest.raises(UserError, match="not found"):
        apply_checkpoint(
            build_tiny(),
            preset("checkpoint", "esd", path=str(tmp_path / "missing.safetensors")),
            store,
            task_cfg={},
        )
    assert apply_checkpoint(build_tiny(), {"method": "original"}, store, task_cfg={})["id"] == "original"


@pytest.mark.slow
def test_checkpoint_configs_compose_into_the_recipes(compose_cfg):
    from unlearn_exp.unlearning.duo import resolve_recipe
    from unlearn_exp.unlearning.pairs import _plain

    nud = compose_cfg(["checkpoint=duo", "task=nudity"])
    recipe = resolve_recipe(_plain(nud.checkpoint), nud.task)
    assert [a["name"] for a in recipe["adapters"]] == ["Nudity"]
    assert len(pair_prompts(recipe["adapters"][0])) == 64
    vio = compose_cfg(["checkpoint=duo", "task=violence", "checkpoint.beta=1000"])
    adapters = resolve_recipe(_plain(vio.checkpoint), vio.task)["adapters"]
    assert [a["name"] for a in adapters] == ["Blood", "Gun", "Horror", "Suffer"]
    assert all(a["n_pairs"] == 32 and a["strength"] == 0.8 for a in adapters)  # Horror quirk fixed
    for method in ("esd", "uce", "original"):
        cfg = compose_cfg([f"checkpoint={method}"]).checkpoint
        assert cfg.method == method and "path" in cfg and "beta" in cfg
    with pytest.raises(UserError, match="beta must be > 0"):
        apply_checkpoint(
            build_tiny(),
            compose_cfg(["checkpoint=duo", "checkpoint.beta=-1"]).checkpoint,
            "/nonexistent",
            task_cfg={},
        )


# ----------------------------------------------------------------------------- UCE on SD3
def _official_uce_flux_edit(comps, erase, guides, preserve, lamb=0.5, erase_scale=1.0, preserve_scale=0.7):
    """A transcription of the official UCE edit for an MMDiT (trainscripts/uce_flux_edit.py of
    rohitgandikota/unified-concept-editing), on SD3: the conditioning comes from diffusers'
    ``StableDiffusion3Pipeline.encode_prompt``; c is the joint sequence at each encoder's last real token
    (``attention_mask.sum() - 2``, CLIP's and T5's) for ``context_embedder``, the pooled vector for
    ``text_embedder.linear_1``; v* is the module's output (its bias included, as the script's)."""
    pipe = comps.to_diffusers()
    n_clip = comps.tokenizer.model_max_length
    L = comps.max_sequence_length
    embeds = {}
    for e in dict.fromkeys(erase + guides + preserve):
        seq, _, pooled, _ = pipe.encode_prompt(
            e, e, e, do_classifier_free_guidance=False, max_sequence_length=L
        )
        i_clip = comps.tokenizer(e, padding="max_length", return_tensors="pt").attention_mask.sum() - 2
        i_t5 = (
            comps.tokenizer_3(e, padding="max_length", max_length=L, return_tensors="pt").attention_mask.sum()
            - 2
        )
        rows = torch.stack([seq[0, i_clip], seq[0, n_clip:][i_t5]])  # two rows: CLIP's and T5's
        embeds[e] = {"sequence": rows.double(), "pooled": pooled.double()}
    modules = {
        "context_embedder": ("sequence", comps.transformer.context_embedder),
        "time_text_embed.text_embedder.linear_1": (
            "pooled",
            comps.transformer.time_text_embed.text_embedder.linear_1,
        ),
    }
    out = {}
    for name, (reads, module) in modules.items():
        w_old, b = module.weight.double(), module.bias.double()
        mat1 = lamb * w_old
        mat2 = lamb * torch.eye(w_old.shape[1], dtype=torch.float64)
        for e, g in zip(erase, guides):
            for c_i, c_g in zip(embeds[e][reads], embeds[g][reads]):
                v_star = (w_old @ c_g + b)[:, None]
                mat1 += erase_scale * v_star @ c_i[None]
                mat2 += erase_scale * c_i[:, None] @ c_i[None]
        for p in preserve:
            for c_i in embeds[p][reads]:
                v_star = (w_old @ c_i + b)[:, None]
                mat1 += preserve_scale * v_star @ c_i[None]
                mat2 += preserve_scale * c_i[:, None] @ c_i[None]
        out[f"{name}.weight"] = mat1 @ torch.inverse(mat2)
    return out


def test_uce_on_sd3_equals_the_official_mmdit_edit_transcribed():
    from unlearn_exp.models import build_tiny_sd3
    from unlearn_exp.unlearning.uce import text_reading_layers

    comps = build_tiny_sd3(seed=0)
    with torch.no_grad():  # the script's v* carries the bias: equal to ours where the biases are 0
        comps.transformer.context_embedder.bias.zero_()
        comps.transformer.time_text_embed.text_embedder.linear_1.bias.zero_()
    erase, preserve = ["nudity", "gore"], ["a cat"]
    recipe = {
        "erase": erase,
        "guide": "",
        "preserve": preserve,
        "lamb": 0.5,
        "erase_scale": 1.0,
        "preserve_scale": 0.7,
        "templates": [],
    }
    layers = text_reading_layers(comps.transformer, "sd3")
    assert {n: reads for n, (_, reads) in layers.items()} == {
        "context_embedder": "sequence",
        "time_text_embed.text_embedder.linear_1": "pooled",
    }
    ours = uce_edit(comps, recipe)
    official = _official_uce_flux_edit(comps, erase, ["", ""], preserve)
    assert ours.keys() == official.keys()
    for k in ours:
        torch.testing.assert_close(ours[k].double(), official[k], atol=1e-5, rtol=1e-4)
        assert not torch.allclose(ours[k], dict(comps.transformer.named_parameters())[k], atol=1e-3)


def test_uce_on_sd3_maps_the_erased_concept_to_the_guide_with_the_bias_kept(tmp_path):
    from unlearn_exp.models import build_tiny_sd3
    from unlearn_exp.unlearning.uce import concept_features

    comps = build_tiny_sd3(seed=1, t5=False)  # no T5: the CLIP rows alone
    recipe = {**preset("checkpoint", "uce"), "erase": {"nudity": ["nudity"]}, "lamb": 1e-4}
    store = ArtifactStore(tmp_path / "store")
    original = build_tiny_sd3(seed=1, t5=False)
    info = apply_checkpoint(comps, recipe, store, task_cfg={"name": "nudity"})
    assert info["method"] == "uce" and info["files"]
    c_e, c_g = concept_features(original, ["nudity"]), concept_features(original, [""])
    assert c_e["sequence"].shape[0] == 1  # one CLIP row without T5
    with torch.no_grad():  # a small lamb: the edited map sends the concept where the guide went
        for new, old, reads in [
            (comps.transformer.context_embedder, original.transformer.context_embedder, "sequence"),
            (
                comps.transformer.time_text_embed.text_embedder.linear_1,
                original.transformer.time_text_embed.text_embedder.linear_1,
                "pooled",
            ),
        ]:
            torch.testing.assert_close(new(c_e[reads]), old(c_g[reads]), atol=2e-3, rtol=0)
            torch.testing.assert_close(new.bias, old.bias)
    # every other weight untouched; the file loads back through checkpoint.path, and a file of other
    # weights is refused in one line
    changed = [
        k
        for k, v in comps.transformer.state_dict().items()
        if not torch.equal(v, original.transformer.state_dict()[k])
    ]
    assert sorted(changed) == ["context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight"]
    loaded = build_tiny_sd3(seed=1, t5=False)
    apply_checkpoint(
        loaded, preset("checkpoint", "uce", path=info["files"][0]), store, task_cfg={"name": "nudity"}
    )
    assert torch.equal(loaded.transformer.context_embedder.weight, comps.transformer.context_embedder.weight)
    bad = tmp_path / "bad.safetensors"
    save_file({"transformer.proj_out.weight": comps.transformer.proj_out.weight.contiguous()}, str(bad))
    with pytest.raises(
        UserError, match="not context_embedder/time_text_embed.text_embedder.linear_1 weights"
    ):
        apply_checkpoint(
            build_tiny_sd3(seed=1, t5=False),
            preset("checkpoint", "uce", path=str(bad)),
            store,
            task_cfg={"name": "nudity"},
        )
