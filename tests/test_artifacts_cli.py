"""Find and export what was built: list, show, and an unlearned checkpoint exported as a diffusers
pipeline that plain diffusers loads and samples like our sampler."""

from __future__ import annotations

import json
import shutil
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
    out = capsys.readouterr().out
    assert "1 artifact(s)" in out
    assert rows[0]["method"] == "uce" and f" {key}" in out and rows[0]["model"] in out  # in full
    assert artifacts.content_id(Path(info["artifact"])) == info["id"]  # the id a cell gives it
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
    # found in the shipped cache when the given cache does not hold it; the grid's sampler, so that
    # diffusers samples as our sampler does
    key = Path(info["artifact"]).name
    assert (
        artifacts.main(
            ["--cache", str(tmp_path / "e"), "export", key, str(tmp_path / "out"), "--scheduler", "grid"]
        )
        == 0
    )
    assert "DPMSolverMultistepScheduler" in (tmp_path / "out" / "export.md").read_text()
    pipe = PixelDiffusionPipeline.from_pretrained(str(tmp_path / "out"))
    ours = sample(comps, ["a grape"], [4], steps=4, guidance_scale=6.0).images
    torch.testing.assert_close(
        pipe(["a grape"], num_inference_steps=4, guidance_scale=6.0, seeds=[4]).tensors,
        ours,
        atol=1e-4,
        rtol=0,
    )


# ------------------------------------------------------------------ what export keeps and changes
@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny SD-layout folder (PNDM scheduler) with a tiny safety checker and feature extractor, and
    a UCE artifact built on it."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    from unlearn_exp.models import build_tiny, save_components

    base = tmp_path_factory.mktemp("sd")
    sd = save_components(build_tiny(), base / "sd")
    torch.manual_seed(0)
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    clip = CLIPConfig(
        text_config={**small, "vocab_size": 100, "bos_token_id": 0, "eos_token_id": 1},
        vision_config={**small, "image_size": 32, "patch_size": 16},
        projection_dim=8,
    )
    StableDiffusionSafetyChecker(clip).save_pretrained(sd / "safety_checker")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        sd / "feature_extractor"
    )
    index = json.loads((sd / "model_index.json").read_text())
    index.update(
        safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
        feature_extractor=["transformers", "CLIPImageProcessor"],
        requires_safety_checker=True,
    )
    (sd / "model_index.json").write_text(json.dumps(index))
    model = ["model=sd14", f"model.path={sd}", "model.resolution=32", "model.dtype=float32"]
    cfg = compose([*model, "task=nudity", "checkpoint=uce"], hydra=False)
    info = apply_checkpoint(
        load_model(cfg.model), cfg.checkpoint, ArtifactStore(base / "cache"), task_cfg=cfg.task
    )
    return sd, model, Path(info["artifact"])


def test_export_keeps_the_source_models_scheduler_and_safety_checker(sd_folder, tmp_path, capsys):
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    sd, model, folder = sd_folder
    out = artifacts.export(folder, tmp_path / "pipe", model)
    said = capsys.readouterr().out.splitlines()
    assert f"scheduler: kept the original PNDMScheduler (scheduler/ copied from {sd})" in said
    assert any(s.startswith("safety_checker: kept the original StableDiffusionSafetyChecker") for s in said)
    assert any(s.startswith("feature_extractor: kept the original CLIPImageProcessor") for s in said)
    assert any(s.startswith("unet: UCE weights loaded") for s in said)
    assert (out / "export.md").read_text().count("\n- ") == len(said)  # a title, then each line
    assert json.loads((out / "export.json").read_text())["changes"] == said
    for part in ("scheduler", "safety_checker", "feature_extractor"):
        for f in (sd / part).iterdir():
            assert (out / part / f.name).read_bytes() == f.read_bytes(), f
    index = json.loads((out / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"] and index["requires_safety_checker"] is True
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    assert isinstance(pipe.scheduler, PNDMScheduler)
    assert (
        isinstance(pipe.safety_checker, StableDiffusionSafetyChecker) and pipe.feature_extractor is not None
    )


def test_export_with_the_grids_sampler_and_no_safety_checker_says_so(sd_folder, tmp_path, capsys):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    sd, model, folder = sd_folder
    key = folder.name
    cache = folder.parents[2]
    artifacts.export(folder, tmp_path / "p", model)  # with the safety checker: the next export removes it
    capsys.readouterr()
    argv = ["--cache", str(cache), "export", key, str(tmp_path / "p"), "--scheduler", "grid"]
    argv.append("--no-safety-checker")
    assert artifacts.main([*argv, "--", *model]) == 0
    said = capsys.readouterr().out.splitlines()
    assert (
        "scheduler: replaced the original PNDMScheduler by the grid's sampler DPMSolverMultistepScheduler "
        "(sampling.scheduler=dpmsolver++), as --scheduler grid asks" in said
    )
    assert "safety_checker: in the source model, left out (--no-safety-checker)" in said
    assert "feature_extractor: in the source model, left out (--no-safety-checker)" in said
    assert not (tmp_path / "p" / "safety_checker").exists()
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "p"))
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler) and pipe.safety_checker is None
    with pytest.raises(SystemExit):  # argparse refuses an unknown choice
        artifacts.main(["--cache", str(cache), "export", key, str(tmp_path / "q"), "--scheduler", "ddim"])


def test_export_of_a_model_without_a_folder_says_what_it_lacks(uce_cache, tmp_path, capsys):
    root, info, _ = uce_cache
    artifacts.export(artifacts.find(root, Path(info["artifact"]).name), tmp_path / "pipe", ["model=tiny"])
    said = capsys.readouterr().out.splitlines()
    assert said[2] == (
        "scheduler: the base model (built in memory, no folder) has none; "
        "wrote the grid's sampler DPMSolverMultistepScheduler (sampling.scheduler=dpmsolver++)"
    )
    assert said[3:] == [
        "safety_checker: not in the base model (built in memory, no folder), none written",
        "feature_extractor: not in the base model (built in memory, no folder), none written",
    ]


def test_list_names_the_checkpoint_a_c_star_was_learned_on(tmp_path, capsys):
    """The shipped C* of the toy, listed from a cache that holds it: its checkpoint is named by the
    shipped DUO artifact with that content id (beta 1000), in full."""
    from unlearn_exp.toy.artifacts import SHIPPED

    c_star = next(p for p in sorted((SHIPPED / "inversion").iterdir()) if p.is_dir())
    learned_on = json.loads((c_star / "_key.json").read_text())["key"]["checkpoint"]
    shutil.copytree(c_star, tmp_path / "inversion" / c_star.name)
    from unlearn_exp.unlearning.duo import trained_duo_id

    shipped = sorted((SHIPPED / "unlearning" / "duo").iterdir())
    assert [artifacts.content_id(p) for p in shipped] == [trained_duo_id(p) for p in shipped]
    duo = [p for p in shipped if artifacts.content_id(p) == learned_on]
    assert len(duo) == 1
    beta = json.loads((duo[0] / "_key.json").read_text())["key"]["checkpoint"]["beta"]
    assert artifacts.main(["--cache", str(tmp_path), "list"]) == 0
    out = capsys.readouterr().out
    assert "learned on" in out.splitlines()[0]
    assert f"duo beta={beta} {duo[0].name} (id {learned_on})" in out and c_star.name in out
    artifacts.export(c_star, tmp_path / "c", [])
    assert f"learned on: duo beta={beta} {duo[0].name} (id {learned_on})" in capsys.readouterr().out
    assert (tmp_path / "c" / "learned_embeds.safetensors").is_file() and (
        tmp_path / "c" / "export.json"
    ).is_file()
