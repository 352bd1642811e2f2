"""W&B tracking offline: the run files hold the expected keys; failures never raise."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf
from PIL import Image

from unlearn_exp import launch, tracking
from unlearn_exp.errors import UserError

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def _cfg(tmp_path: Path, logger: dict | None = None):
    return OmegaConf.create(
        {
            "stage": "cell",
            "name": "nudity_duo",
            "seed": 42,
            "paths": {"output_root": str(tmp_path)},
            "task": {"name": "nudity"},
            "checkpoint": {"method": "duo", "beta": 1000},
            "guidance": {"name": "sld"},
            "embedding": {"source": "inverted"},
            "logger": logger
            or {
                "name": "wandb",
                "project": "unlearn-exp-test",
                "entity": None,
                "mode": "offline",
                "group": "${name}",
            },
        }
    )


def _cell_row():
    return {
        "experiment": "nudity_duo",
        "task": "nudity",
        "scale": "tiny",
        "model_id": "tiny-0",
        "checkpoint_method": "duo",
        "beta": 1000.0,
        "checkpoint_id": "ck1",
        "guidance": "sld",
        "embedding": "inverted",
        "embedding_id": "em1",
        "dsr": 0.75,
        "dsr_lo": 0.3,
        "dsr_hi": 0.95,
        "n_images": 4,
        "n_safe": 3,
        "pp_coco": 0.81,
        "pp_bench": 0.7,
        "benign_acc": math.nan,
        "judge_profile": "nudenet_duo",
        "judge_hash": "jh",
        "cell_key": "abc123",
    }


def _images(tmp_path: Path):
    ims, rows = [], []
    for i in range(4):
        im = Image.new("RGB", (16, 16), (60 * i, 10, 200 - 40 * i))
        p = tmp_path / f"img{i}.png"
        im.save(p)
        ims.append(im)
        rows.append(
            {
                "case_id": f"c{i}",
                "image_index": 0,
                "prompt": f"prompt {i}",
                "seed": i,
                "image_path": str(p),
                "judge_raw": [{"class": "FACE_F", "score": 0.5}],
                "safe": i != 2,
                "lpips": 0.1 * i,
            }
        )
    return ims, pd.DataFrame(rows)


def test_offline_run_holds_config_metrics_grid_and_table(tmp_path: Path):
    cfg = _cfg(tmp_path)
    ims, rows = _images(tmp_path)
    with tracking.Tracker.from_cfg(cfg).start(cfg, tags=["extra"]) as tr:
        assert tr.active
        tr.log_cell(_cell_row(), rows, ims)
    runs = tracking.find_offline_runs(tmp_path)
    assert len(runs) == 1
    run = tracking.read_offline_run(runs[0], wait_s=15)
    assert run["group"] == "nudity_duo" and run["project"] == "unlearn-exp-test"
    assert set(run["tags"]) == {
        "checkpoint=duo/1000",
        "guidance=sld",
        "embedding=inverted",
        "task=nudity",
        "extra",
    }
    assert run["name"] == "nudity/duo/1000/sld-inverted"
    assert run["config"]["checkpoint"] == {"method": "duo", "beta": 1000}
    assert run["config"]["logger"]["group"] == "nudity_duo"  # resolved
    s = run["summary"]
    for k, v in {"dsr": 0.75, "dsr_lo": 0.3, "dsr_hi": 0.95, "pp_coco": 0.81, "pp_bench": 0.7}.items():
        assert s[k] == pytest.approx(v)
    assert s["n_images"] == 4 and s["n_safe"] == 3
    assert "benign_acc" not in s  # NaN is not logged
    assert s["cell_key"] == "abc123" and s["judge_hash"] == "jh" and s["checkpoint_id"] == "ck1"
    assert s["samples"]["_type"] == "image-file"
    assert s["images"]["_type"] == "table-file" and s["images"]["nrows"] == 4
    assert run["exit_code"] == 0
    hist = run["history"]
    assert hist and hist[0]["dsr"] == pytest.approx(0.75)
    # the grid and the table are on disk in the run folder
    media = runs[0] / "files" / "media"
    assert list((media / "images").glob("samples_*.png"))
    tables = list((media / "table").glob("images_*.table.json"))
    assert tables
    import json

    table = json.loads(tables[0].read_text())
    assert table["columns"][0] == "image" and "prompt" in table["columns"] and len(table["data"]) == 4


def test_multirun_jobs_give_one_run_each(tmp_path: Path):
    for guidance in ("none", "safree"):
        cfg = _cfg(tmp_path)
        cfg.guidance.name = guidance
        tr = tracking.Tracker.from_cfg(cfg).start(cfg)
        tr.log_metrics({"x": 1.0})
        tr.finish()
    runs = [tracking.read_offline_run(r, wait_s=15) for r in tracking.find_offline_runs(tmp_path)]
    assert len({r["run_id"] for r in runs}) == 2
    assert {t for r in runs for t in r["tags"] if t.startswith("guidance=")} == {
        "guidance=none",
        "guidance=safree",
    }


def test_tracking_failure_never_raises(tmp_path: Path, monkeypatch, caplog):
    import wandb

    cfg = _cfg(tmp_path)

    def boom(*a, **k):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", boom)
    tr = tracking.Tracker.from_cfg(cfg).start(cfg)
    assert not tr.active and "no network" in tr.failed
    tr.log_cell(_cell_row(), None, None)  # no-op, no error
    tr.finish()
    monkeypatch.undo()

    # a failure after the run started: the run is closed, later calls are no-ops
    tr = tracking.Tracker.from_cfg(cfg).start(cfg)
    assert tr.active
    monkeypatch.setattr(tr.run, "log", boom)
    with caplog.at_level("WARNING", logger="unlearn_exp.tracking"):
        tr.log_cell(_cell_row(), None, None)
    assert not tr.active and "wandb log_cell" in tr.failed
    assert any("tracking off" in r.message for r in caplog.records)
    tr.log_metrics({"a": 1})
    tr.finish()


def test_logger_none_and_bad_name(tmp_path: Path):
    cfg = _cfg(tmp_path, {"name": "none"})
    tr = tracking.Tracker.from_cfg(cfg).start(cfg)
    tr.log_cell(_cell_row(), None, None)
    tr.finish()
    assert not tracking.find_offline_runs(tmp_path)
    with pytest.raises(UserError, match="logger.name"):
        tracking.Tracker({"name": "tensorboard"})


def test_image_grid_layout():
    ims = [Image.new("RGB", (10, 8), (i * 40, 0, 0)) for i in range(5)]
    g = tracking.image_grid(ims, pad=2)
    assert g.size == (3 * 10 + 4 * 2, 2 * 8 + 3 * 2)
    assert g.getpixel((2 + 11 + 1, 2)) == (40, 0, 0)  # second image, first row
    assert g.getpixel((2, 2 + 8 + 2 + 1)) == (120, 0, 0)  # fourth image, second row


def test_lightning_logger_offline_loss_curve(tmp_path: Path):
    import lightning as L
    import torch

    class Fit(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, _):
            loss = ((self.w - 1.0) ** 2).sum()
            self.log("loss", loss)
            self.log("duo/loss", loss)
            self.log("duo/step", float(self.global_step))
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.zeros(6, 1), batch_size=1)
    lg = tracking.lightning_logger({"name": "wandb", "project": "t", "mode": "offline"}, "duo", tmp_path)
    assert type(lg).__name__ == "WandbLogger"
    trainer = L.Trainer(
        max_steps=6,
        logger=lg,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    from unlearn_exp.training import define_stage_axis

    define_stage_axis(lg, "duo")
    trainer.fit(Fit(), data)
    lg.experiment.finish()
    run = tracking.read_offline_run(tracking.find_offline_runs(tmp_path)[0], wait_s=15)
    losses = [h["loss"] for h in run["history"] if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert "stage=duo" in run["tags"]
    # the stage's losses are plotted against its own step
    assert run["step_metrics"].get("duo/*") == "duo/step"
    assert [h["duo/step"] for h in run["history"] if "duo/loss" in h] == [0, 1, 2, 3, 4, 5]

    csv = tracking.lightning_logger({"name": "none"}, "inversion", tmp_path / "csv")
    assert type(csv).__name__ == "CSVLogger"


def test_pin_gpu_worker_gives_distinct_gpus(tmp_path: Path, monkeypatch):
    import subprocess
    import sys

    code = (
        "import os, sys, time; from unlearn_exp.launch import pin_gpu_worker; "
        "g = pin_gpu_worker(sys.argv[1]); print(g, os.environ['CUDA_VISIBLE_DEVICES'], flush=True); "
        "time.sleep(float(sys.argv[2]))"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "3,5"}
    first = subprocess.Popen(  # holds its GPU until killed, however slow the machine is
        [sys.executable, "-c", code, str(tmp_path), "300"], env=env, stdout=subprocess.PIPE, text=True
    )
    line1 = first.stdout.readline().split()
    second = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), "0"], env=env, capture_output=True, text=True, check=True
    )
    first.kill()
    first.wait(timeout=30)
    assert line1 == ["3", "3"]
    assert second.stdout.split() == ["5", "5"]
    # the lock dies with its process: a later worker gets the first GPU again
    third = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), "0"], env=env, capture_output=True, text=True, check=True
    )
    assert third.stdout.split() == ["3", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert launch.pin_gpu_worker(str(tmp_path)) is None


@pytest.mark.slow
def test_guidance_none_is_one_run_for_its_three_grid_positions(tmp_path: Path):
    from tests.helpers import compose

    def cfg(*o):
        return compose(["model=tiny", "guidance=none", *o, f"paths.output_root={tmp_path}"], hydra=False)

    ids = {tracking.cell_run_id(cfg(f"embedding={e}")) for e in ("explicit", "inverted", "shared")}
    assert len(ids) == 1 and next(iter(ids)).startswith("cell-")
    assert {t for t in tracking.cell_tags(cfg("embedding=inverted")) if t.startswith("embedding=")} == {
        "embedding=none"
    }
    sld = {
        tracking.cell_run_id(compose(["model=tiny", "guidance=sld", f"embedding={e}"], hydra=False))
        for e in ("explicit", "inverted")
    }
    assert len(sld) == 2 and not sld & ids
    # the offline run folder lives under the job's output folder, not the repository root
    tr = tracking.Tracker.from_cfg(cfg("logger=wandb"))
    assert str(tr.dir).startswith(str(tmp_path))


def test_lineage_checkpoint_concept_results_in_an_offline_run(tmp_path: Path):
    from unlearn_exp.guidance import Concept

    lora = tmp_path / "pytorch_lora_weights.safetensors"
    lora.write_bytes(b"lora")
    cstar = tmp_path / "learned_embeds.safetensors"
    cstar.write_bytes(b"cstar")
    results = tmp_path / "results"
    results.mkdir()
    for name in ("cells.parquet", "images.parquet"):
        (results / name).write_bytes(b"table")
    row = {
        "checkpoint_method": "duo",
        "checkpoint_id": "abc123",
        "cell_key": "k1",
        "spec_key": "s1",
        "dsr": 0.5,
    }
    tracker = tracking.Tracker({"name": "wandb", "mode": "offline", "project": "t"}, dir=tmp_path)
    tracker.start(OmegaConf.create({"name": "x", "checkpoint": {"method": "duo", "beta": 250}}))
    tracker.log_lineage(
        row,
        {"method": "duo", "beta": 250.0, "id": "abc123", "files": [str(lora)]},
        Concept("inverted", ["<c*>"], "inverted:feed", str(cstar)),
        results,
        built=["unlearning/duo/abc123", "inversion/feed"],
    )
    tracker.finish()
    run = tracking.read_offline_run(tracking.find_offline_runs(tmp_path)[0], wait_s=15)
    arts = {a["type"]: a for a in run["artifacts"]}
    assert arts["checkpoint"]["name"] == "checkpoint-duo-abc123"
    assert arts["checkpoint"]["files"] == [lora.name] and arts["checkpoint"]["metadata"]["beta"] == 250.0
    assert arts["concept"]["metadata"]["learned_on"] == "checkpoint-duo-abc123"
    assert arts["results"]["metadata"]["inputs"] == {
        "checkpoint": "checkpoint-duo-abc123",
        "concept": "concept-inverted-feed",
    }
