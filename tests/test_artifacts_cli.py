"""Find and export what was built: list, show, and an unlearned checkpoint exported as a diffusers
pipeline that plain diffusers loads and samples like our sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import compose
from unlearn_exp import artifacts
from unlearn_exp.errors import UserError
from unlearn_exp.models import load_model
from unlearn_exp.sampling import sample
from unlearn_exp.store import ArtifactStore
from unlearn_exp.unlearning import apply_checkpoint


@pytest.fixture(scope="module")
def uce_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    cfg = compose(["model=tiny", "task=nudity", "checkpoint=uce"], hydra=False)
    comps = load_model(cfg.model)
    info = apply_checkpoint(comps, cfg.checkpoint, ArtifactStore(root), task_cfg=cfg.task)
    return root, info, comps


def test_list_and_show_in_human_terms(uce_cache, capsys):
    root, info, _ = uce_cache
    key = Path(info["artifact"]).name  # the cache key (info["id"] names the weights by content)
    rows = artifacts.list_artifacts(root)
    assert [(r["kind"], r["task"], r["key"]) for r in rows] == [("unlearning/uce", "nudity", key)]
    assert rows[0]["model"].startswith("tiny:") and rows[0]["size_mb"] > 0
    assert artifacts.list_artifacts(root, task="violence") == []
    assert artifacts.main(["--cache", str(root), "list"]) == 0
    assert "1 artifact(s)" in capsys.readouterr().out
    text = artifacts.show(artifacts.find(root, key[:6]))
    assert "verified: yes" in text and "uce_cross_attention.safetensors" in text
    with pytest.raises(UserError, match="no artifact with key"):
        artifacts.find(root, "ffffffff")


@pytest.mark.slow
def test_exported_checkpoint_loads_in_plain_diffusers_and_samples_the_same(uce_cache, tmp_path):
    from diffusers import StableDiffusionPipeline

    root, info, edited = uce_cache
    key = Path(info["artifact"]).name
    out = artifacts.export(artifacts.find(root, key), tmp_path / "pipe", ["model=tiny"])
    assert (out / "model_index.json").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    ref = pipe(
        ["a naked woman"],
        num_inference_steps=6,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(4),
        output_type="np",
    ).images
    ours = sample(edited, ["a naked woman"], [4], steps=6).images
    assert np.abs(ref - ((ours + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()).max() < 1e-4
    with pytest.raises(UserError, match="was built on model"):
        artifacts.export(artifacts.find(root, key), tmp_path / "other", ["model=tiny", "model.seed=1"])


@pytest.mark.slow
def test_a_shipped_toy_checkpoint_exports_as_a_pixel_pipeline(tmp_path):
    from unlearn_exp.models.pixel_pipeline import PixelDiffusionPipeline
    from unlearn_exp.toy.artifacts import SHIPPED

    cfg = compose(["+experiment=toy_duo", "checkpoint.beta=2000"], hydra=False)
    comps = load_model(cfg.model)
    from unlearn_exp.cell import apply_unlearning

    info = apply_unlearning(
        cfg, comps, ArtifactStore(tmp_path / "c", shipped=[SHIPPED]), cfg.checkpoint, None
    )
    # found in the shipped cache when the given cache does not hold it
    assert (
        artifacts.main(
            ["--cache", str(tmp_path / "empty"), "export", Path(info["artifact"]).name, str(tmp_path / "out")]
        )
        == 0
    )
    pipe = PixelDiffusionPipeline.from_pretrained(str(tmp_path / "out"))
    ours = sample(comps, ["a grape"], [4], steps=4, guidance_scale=6.0).images
    torch.testing.assert_close(
        pipe(["a grape"], num_inference_steps=4, guidance_scale=6.0, seeds=[4]).tensors,
        ours,
        atol=1e-4,
        rtol=0,
    )
