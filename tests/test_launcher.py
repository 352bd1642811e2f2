"""Launcher presets: hydra/launcher=joblib | submitit_local | submitit_slurm compose with our settings,
joblib pins one GPU per worker, and submitit_local runs a two-cell sweep end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def _hydra_cfg(*overrides: str):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides), return_hydra_config=True).hydra
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.filterwarnings("ignore")
@pytest.mark.slow
def test_presets_compose_with_our_settings():
    j = _hydra_cfg("hydra/launcher=joblib")
    assert j.launcher._target_.endswith("JoblibLauncher")
    assert (j.launcher.n_jobs, j.launcher.batch_size, j.launcher.pre_dispatch) == (2, "1", "n_jobs")
    assert j.callbacks.gpu_pinning._target_ == "unlearn_exp.launch.GpuPinning"

    local = _hydra_cfg("hydra/launcher=submitit_local")
    assert local.launcher._target_.endswith("LocalLauncher") and local.launcher.gpus_per_node == 0
    assert "gpu_pinning" not in (local.callbacks or {})

    slurm = _hydra_cfg(
        "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=2"
    )
    lc = slurm.launcher
    assert lc._target_.endswith("SlurmLauncher")
    assert (lc.partition, lc.gpus_per_node, lc.timeout_min, lc.mem_gb, lc.max_num_timeout) == (
        "gpu",
        2,
        240,
        48,
        3,
    )
    # the default launcher is untouched
    assert _hydra_cfg().launcher._target_.endswith("BasicLauncher")


def _sweep(tmp_path: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "unlearn_exp",
        "--multirun",
        *([] if any(o.startswith("stage=") for o in overrides) else ["stage=compose"]),
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **(env or {})}
    res = subprocess.run(
        [*cmd, *overrides], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=240, check=False
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return res


def _job_configs(sweep: Path) -> list[dict]:
    return [yaml.safe_load(p.read_text()) for p in sorted(sweep.glob("[0-9]*/.hydra/config.yaml"))]


@pytest.mark.slow
def test_joblib_pins_one_gpu_per_worker(tmp_path: Path):
    res = _sweep(
        tmp_path,
        "hydra/launcher=joblib",
        "guidance=none,sld",
        "name=${oc.env:CUDA_VISIBLE_DEVICES,none}",  # a root key: printed as `name: 7`
        env={"CUDA_VISIBLE_DEVICES": "7,9", "UNLEARN_EXP_GPU_LOCKS": str(tmp_path / "locks")},
    )
    probes = sorted(
        line.split(":", 1)[1].strip().strip("'")
        for line in res.stdout.splitlines()
        if line.startswith("name:")
    )
    assert probes == ["7", "9"]  # each job resolved CUDA_VISIBLE_DEVICES inside its own pinned worker
    assert {c["guidance"]["name"] for c in _job_configs(tmp_path / "sweep")} == {"none", "sld"}


@pytest.mark.slow
def test_submitit_local_runs_a_two_cell_sweep(tmp_path: Path):
    """The cluster path with real work: two tiny cells through submitit's local executor."""
    import pandas as pd
    import torch
    import torchvision

    csv = tmp_path / "prompts.csv"
    pd.DataFrame({"prompt": ["a cat", "a naked man"], "evaluation_seed": [1, 2]}).to_csv(csv, index=False)
    trunk = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(torchvision.models.alexnet().state_dict(), trunk)
    _sweep(
        tmp_path,
        "hydra/launcher=submitit_local",
        "stage=cell",
        "model=tiny",
        "guidance=none,sld",
        "benchmark=prompts_file",
        f"benchmark.path={csv}",
        f"pp.prompts.path={csv}",
        "pp.prompts.head=null",
        "pp.prompts.expected_prompts=null",
        f"pp.metric.trunk_path={trunk}",
        "sampling.steps=2",
        "sampling.progress=false",
        f"paths.root_dir={tmp_path}",
    )
    sweep = tmp_path / "sweep"
    configs = _job_configs(sweep)
    assert [c["guidance"]["name"] for c in configs] == ["none", "sld"]
    assert len(list((sweep / ".submitit").glob("*/*_0_log.out"))) == 2  # two submitit jobs
    cells = sorted((tmp_path / "results").rglob("cells.parquet"))
    assert len(cells) == 2
    assert sorted(pd.read_parquet(c).guidance.iloc[0] for c in cells) == ["none", "sld"]
