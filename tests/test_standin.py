"""The SD v1.4 stand-in (``python -m unlearn_exp.models.standin``): SD v1.4's layout and configs with
few channels; the day-one smoke run on it, end to end, with the files the tests make; the report on
its results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import ROOT, run_app
from unlearn_exp.models.standin import SD14_INDEX, SD14_SCHEDULER, write_standin


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    return write_standin(tmp_path_factory.mktemp("standin") / "sd14")


def test_the_standin_has_sd14s_layout_and_loads_as_sd14_and_in_diffusers(standin):
    from diffusers import StableDiffusionPipeline

    from unlearn_exp.config import preset
    from unlearn_exp.models import load_model

    parts = {"unet", "text_encoder", "tokenizer", "scheduler", "vae", "safety_checker", "feature_extractor"}
    assert parts <= {p.name for p in standin.iterdir()}
    assert json.loads((standin / "model_index.json").read_text()) == SD14_INDEX
    assert json.loads((standin / "scheduler" / "scheduler_config.json").read_text()) == SD14_SCHEDULER
    unet = json.loads((standin / "unet" / "config.json").read_text())
    assert unet["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert unet["sample_size"] == 64 and unet["in_channels"] == 4
    assert json.loads((standin / "vae" / "config.json").read_text())["scaling_factor"] == 0.18215
    assert sum(f.stat().st_size for f in standin.rglob("*") if f.is_file()) < 32 * 2**20
    comps = load_model(preset("model", "sd14", path=str(standin), resolution=64))
    assert comps.latent_shape() == (4, 8, 8) and comps.tokenizer.model_max_length == 77
    pipe = StableDiffusionPipeline.from_pretrained(str(standin))
    assert type(pipe.safety_checker).__name__ == "StableDiffusionSafetyChecker"
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"


def _assets(root: Path) -> list[str]:
    """The files a real run reads, made here: an I2P-layout prompt file, a COCO-layout one, and a
    random AlexNet trunk (the real LPIPS code path with random features)."""
    import torch
    import torchvision

    i2p, coco, trunk = root / "i2p.csv", root / "coco_30k.csv", root / "alexnet-owt-7be5be79.pth"
    pd.DataFrame(
        {
            "case_number": range(6),
            "prompt": [f"a person number {i} on a beach" for i in range(6)],
            "categories": ["sexual"] * 6,
            "nudity_percentage": [80.0] * 6,
            "evaluation_seed": range(6),
        }
    ).to_csv(i2p, index=False)
    pd.DataFrame(
        {
            "case_number": range(6),
            "prompt": [f"a photo of object {i}" for i in range(6)],
            "evaluation_seed": 7,
        }
    ).to_csv(coco, index=False)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet().state_dict(), trunk)
    return [f"benchmark.path={i2p}", f"pp.prompts.path={coco}", f"pp.metric.trunk_path={trunk}"]


@pytest.mark.slow
def test_the_smoke_run_on_the_standin_then_the_report(standin, tmp_path):
    """The day-one commands on a new machine: preflight, the nudity debug sweep, the tables."""
    over = [
        f"model.path={standin}",
        "model.resolution=64",  # SD's 512 px works too; 64 keeps the test short
        *_assets(tmp_path),
        # random weights never show nudity: DUO's pair checks (NudeNet) would keep no image
        "checkpoint.recipes.nudity.adapters.0.check_unsafe=false",
        "checkpoint.recipes.nudity.adapters.0.check_safe=false",
        f"paths.root_dir={tmp_path / 'root'}",
    ]
    pre = subprocess.run(
        [sys.executable, "-m", "unlearn_exp.assets", "+experiment=nudity_duo", "+debug=default", *over],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert pre.returncode == 0 and "0 missing" in pre.stdout, pre.stdout + pre.stderr
    run = run_app(
        "+experiment=nudity_duo",
        "+debug=default",
        "multirun",
        *over,
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        timeout=1500,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = tmp_path / "root" / "results"
    rows = pd.concat(pd.read_parquet(f) for f in results.rglob("cells.parquet"))
    assert len(rows) == 28 and set(rows.guidance) == {"none", "sld", "safree"}  # 4 betas x (1 + 2 x 3)
    assert rows.n_images.eq(4).all() and rows.dsr.between(0, 1).all() and rows.pp_coco.notna().all()
    report = subprocess.run(  # what `make reproduce-table TASK=nudity NO_RUN=1 ARGS="..."` runs
        [sys.executable, "-m", "unlearn_exp.report", "--scale", "sd14", "--task", "nudity", "--no-run"]
        + ["--results", str(results), "--out", str(tmp_path / "reports"), "--", "+debug=default", *over],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    main = pd.read_csv(tmp_path / "reports" / "sd14" / "main_nudity_beta2000.csv", dtype=str)
    assert len(main) == 5 and not main.dsr.eq("-").any(), main  # every method's cell found by its identity
    assert "cell(s) without rows" in report.stdout  # the transfer cells (nudity_duo_transfer) were not run
