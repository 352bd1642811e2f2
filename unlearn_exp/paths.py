"""Where a configured path points: the working directory first, then the repository root."""

from __future__ import annotations

from pathlib import Path

from unlearn_exp.hashing import config_hash, to_plain

REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_local_path(path: str) -> str:
    """A relative folder is looked up from the working directory, then from the repository root
    (so shipped paths such as ``unlearn_exp/toy/weights/model`` work from any directory)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists() or not (REPO_ROOT / p).exists():
        return str(p) if (p.exists() or path.startswith((".", "/", "~"))) else path
    return str(REPO_ROOT / p)


def job_dir(cfg) -> Path:
    """A job's own output folder: Hydra's run directory, or (composed outside a Hydra app: tests,
    the demo) one folder per config under ``paths.output_root``."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:
        return (
            Path(cfg.paths.output_root)
            / "outputs"
            / "cells"
            / config_hash({k: to_plain(cfg[k]) for k in cfg if k != "hydra"})
        )
