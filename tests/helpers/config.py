"""The repository's paths, Hydra composition of the real configs, and the Hydra app as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import unlearn_exp  # noqa: F401 - registers the config resolvers (${pid:})

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = str(ROOT / "conf")


def compose(overrides: list[str] | None = None, config_name: str = "config", hydra: bool = True):
    """Compose the real configs as ``python -m unlearn_exp <overrides>`` would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [], return_hydra_config=hydra)


def run_app(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "UNLEARN_EXP_ROOT": str(cwd or ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "unlearn_exp", *args],
        cwd=cwd or ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
