"""Shared fixtures: the tiny model and Hydra composition of the real configs."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocesses too: 2 shared cores oversubscribe badly

import pytest  # noqa: E402
import torch  # noqa: E402

import unlearn_exp  # noqa: E402, F401 - registers the config resolvers (${pid:})

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(ROOT / "conf")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(1)  # 2 shared cores: one thread per process runs fastest here


@pytest.fixture(scope="session")
def tiny():
    """The random-weight tiny model (read-only: tests that modify it build their own)."""
    from unlearn_exp.models import build_tiny

    return build_tiny()


def compose(overrides: list[str] | None = None, config_name: str = "config", hydra: bool = True):
    """Compose the real configs as ``python -m unlearn_exp <overrides>`` would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [], return_hydra_config=hydra)


@pytest.fixture(scope="module")
def one_thread():
    """Small training loops run faster on one thread than on two contended ones (a module uses it
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def compose_cfg():
    return compose


@pytest.fixture
def shared_datasets() -> Path:
    path = os.environ.get("UNLEARN_EXP_SHARED_DATASETS")
    if not path or not Path(path).is_dir():
        pytest.skip("UNLEARN_EXP_SHARED_DATASETS is not set to the folder of published prompt files")
    return Path(path)
