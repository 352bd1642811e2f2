"""The toy grid's shipped DUO checkpoints and concept embeddings, and DUO's ``beta_scale``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unlearn_exp.config import preset
from unlearn_exp.errors import UserError
from unlearn_exp.models import build_tiny
from unlearn_exp.store import ArtifactStore
from unlearn_exp.toy import TOY_MODELS
from unlearn_exp.unlearning.duo import effective_beta, scaled_hyperparameters, train_adapter

ROOT = Path(__file__).resolve().parents[1]


def _shipped(model: str) -> Path:
    return ROOT / "unlearn_exp" / "toy" / TOY_MODELS[model].artifacts


def _cfg(*overrides: str, model: str = "toy"):
    from unlearn_exp.toy.artifacts import compose

    experiment = TOY_MODELS[model].experiment
    return compose([f"+experiment={experiment}", "paths.cache_dir=/nonexistent/cache", *overrides])


# ------------------------------------------------------------------------------ beta_scale
def test_beta_scale_divides_beta_before_the_loss_and_the_scaling():
    duo = preset("checkpoint", "duo")
    assert effective_beta(duo, 500) == 500.0  # conf/checkpoint/duo.yaml: the paper
    assert effective_beta({"beta_scale": 1.0}, 500) == 500.0
    assert effective_beta({"beta_scale": 25.0}, 500) == 20.0
    lr, lam = scaled_hyperparameters(duo, effective_beta({"beta_scale": 25}, 500))
    assert lr == pytest.approx(3e-4 * 100 / 20) and lam == pytest.approx(1e6 * 20 / 100)
    with pytest.raises(UserError, match="beta_scale"):
        effective_beta({"beta_scale": 0}, 500)


def test_beta_map_names_the_beta_of_each_paper_beta():
    """The toy's map: its four entries exactly, linear in log(beta) between them, refused outside its
    range or beside a beta_scale; `checkpoint=duo` (the paper) has none, so SD keys stay as they were."""
    toy = preset("checkpoint", "duo_toy")
    assert [effective_beta(toy, b) for b in (250, 500, 1000, 2000)] == [20.0, 24.0, 28.0, 32.0]
    assert effective_beta(toy, 250 * 2**0.5) == pytest.approx(22.0)
    lr, lam = scaled_hyperparameters(toy, effective_beta(toy, 250))
    assert lr == pytest.approx(3e-4 * 100 / 20) and lam == pytest.approx(1e6 * 20 / 100)
    with pytest.raises(UserError, match="outside checkpoint.beta_map"):
        effective_beta(toy, 4000)
    with pytest.raises(UserError, match="not both"):
        effective_beta({**toy, "beta_scale": 25.0}, 500)
    with pytest.raises(UserError, match="pairs"):
        effective_beta({**toy, "beta_map": [[250]]}, 500)
    assert preset("checkpoint", "duo")["beta_map"] is None
    from unlearn_exp.identity import without_neutral

    assert "beta_map" not in without_neutral("checkpoint", dict(preset("checkpoint", "duo")))


@pytest.mark.slow
def test_a_beta_outside_the_map_is_refused_before_anything_runs():
    from unlearn_exp.validate import validate

    with pytest.raises(UserError, match=r"outside checkpoint.beta_map \(250-2000\)"):
        validate(_cfg("checkpoint.beta=3000"))
    with pytest.raises(UserError, match=r"beta_map\[0\]\[1\]"):
        validate(_cfg("checkpoint.beta_map=[[250,-1],[2000,32]]"))
    with pytest.raises(UserError, match="beta_map"):  # a mapping: refused when composed, in one line
        validate(_cfg("checkpoint.beta_map={250: 20}"))
    with pytest.raises(UserError, match=r"list of \[paper beta, beta\] pairs"):
        validate(_cfg("checkpoint.beta_map=[[250,20,1]]"))
    validate(_cfg("checkpoint.beta=700"))


def test_beta_scale_reaches_the_trainer(tmp_path):
    torch.manual_seed(0)
    comps = build_tiny(seed=0, resolution=16, vae=False)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    hp = preset(
        "checkpoint",
        "duo",
        beta=500,
        beta_scale=50.0,
        steps=1,
        batch=2,
        rank=2,
        alpha=2,
        checkpoint_every=100,
        precision="32-true",
    )
    info = train_adapter(comps, (x, -x), hp, adapter_name="t", work_dir=tmp_path / "w")
    assert info["beta"] == 500.0 and info["beta_effective"] == pytest.approx(10.0)
    assert info["lr"] == pytest.approx(3e-4 * 100 / 10) and info["lambda"] == pytest.approx(1e6 * 10 / 100)


# ------------------------------------------------------------------------------ shipped artifacts
class ShippedOnly(ArtifactStore):
    """The cell runner's store with the shipped cache, where building anything is a test failure
    (image sets included: they are not shipped, and a cell whose ``C*`` is cached never makes one)."""

    def get_or_build(self, kind, key, build):
        def fail(tmp):
            pytest.fail(f"{kind} was not found in the shipped cache and would be rebuilt")

        return super().get_or_build(kind, key, fail)


@pytest.fixture(scope="module")
def toy_cfgs():
    return {
        (model, beta, emb): _cfg(f"checkpoint.beta={beta}", "guidance=sld", f"embedding={emb}", model=model)
        for model in TOY_MODELS
        for beta in (250, 500, 1000, 2000)
        for emb in ("inverted", "shared")
    }


@pytest.mark.parametrize("model", sorted(TOY_MODELS))
def test_toy_duo_sweeps_the_four_paper_betas(model):
    from unlearn_exp.toy.artifacts import sweep_betas

    assert sweep_betas([f"+experiment={TOY_MODELS[model].experiment}"]) == ["250", "500", "1000", "2000"]


@pytest.mark.parametrize("model", sorted(TOY_MODELS))
@pytest.mark.parametrize("beta", [250, 500, 1000, 2000])
@pytest.mark.slow
def test_shipped_artifacts_are_found_under_the_cell_keys(model, beta, toy_cfgs, tmp_path, monkeypatch):
    """``cell.apply_unlearning`` and ``cell.resolve_concept`` on the composed toy grid's configs (the
    UNet's and the MMDiT's) find the DUO checkpoint and both embeddings (inverted, shared) in the
    shipped cache: nothing trains, from any working directory (the keys name the model by content,
    not by path)."""
    monkeypatch.chdir(tmp_path)
    from unlearn_exp.cell import apply_unlearning, image_set_ref, model_identity, resolve_concept
    from unlearn_exp.models import load_model

    shipped = _shipped(model)
    for emb in ("inverted", "shared"):
        cfg = toy_cfgs[(model, beta, emb)]
        store = ShippedOnly(tmp_path / "cache", shipped=[shipped])
        comps = load_model(cfg.model)
        model_id = model_identity(cfg.model)
        image_set = image_set_ref(cfg, comps, store, model_id)
        ck = apply_unlearning(cfg, comps, store, cfg.checkpoint, None)
        assert ck["beta"] == float(beta) and Path(ck["artifact"]).parent.parent.parent == shipped
        assert Path(ck["files"][0]).stat().st_size < 1_000_000
        concept = resolve_concept(cfg, comps, store, model_id, image_set, lambda stage: None, ck["id"])
        assert concept.source == emb and concept.tokens
        assert store.built == [] and len(store.reused) == 2, store.summary()
        if emb == "shared":  # the shared embedding is the one inverted on beta=500
            own = _concept_id(toy_cfgs[(model, 500, "inverted")], tmp_path, shipped)
            assert concept.identity.split(":")[1] == own


def _concept_id(cfg, tmp_path, shipped: Path) -> str:
    from unlearn_exp.cell import apply_unlearning, inversion_key, model_identity
    from unlearn_exp.hashing import file_sha256
    from unlearn_exp.models import load_model

    store = ShippedOnly(tmp_path / "cache", shipped=[shipped])
    inv = [json.loads(f.read_text())["key"] for f in (shipped / "inversion").glob("*/_key.json")]
    learned_on = apply_unlearning(cfg, load_model(cfg.model), store, cfg.checkpoint, None)["id"]
    key = inversion_key(cfg, model_identity(cfg.model), inv[0]["image_set"], learned_on)
    folder = store.get_or_build("inversion", key, None)
    return file_sha256(folder / "learned_embeds.safetensors")[:16]


@pytest.mark.parametrize("model", sorted(TOY_MODELS))
def test_shipped_cache_holds_only_small_files(model):
    shipped = _shipped(model)
    files = [f for f in shipped.rglob("*") if f.is_file()]
    assert files and not [f for f in files if f.suffix in (".ckpt", ".png", ".pt")]
    assert sum(f.stat().st_size for f in files) < 8_000_000
    assert len(list((shipped / "unlearning" / "duo").glob("*/_key.json"))) == 4
    assert len(list((shipped / "inversion").glob("*/_key.json"))) == 4  # shared = beta=500's


def test_toy_duo_words_is_toy_duo_with_lora_on_the_words_keys_and_values():
    from tests.helpers import compose
    from unlearn_exp.identity import cell_spec

    words = compose(["+experiment=toy_duo_words", "checkpoint.beta=2000"], hydra=True)
    plain = compose(["+experiment=toy_duo", "checkpoint.beta=2000"], hydra=True)
    assert words.checkpoint.condition == plain.checkpoint.condition == "unsafe"
    assert "attn2.to_k" in words.checkpoint.target_modules
    assert "attn2.to_k" not in plain.checkpoint.target_modules
    assert words.hydra.sweeper.params == plain.hydra.sweeper.params  # the same grid
    a, b = cell_spec(words), cell_spec(plain)
    assert a["checkpoint"] != b["checkpoint"]  # another checkpoint (never the shipped one)
    assert {k: v for k, v in a.items() if k != "checkpoint"} == {
        k: v for k, v in b.items() if k != "checkpoint"
    }
