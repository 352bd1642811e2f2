"""What one Hydra job does, and how errors reach the user (one line, non-zero exit)."""

from __future__ import annotations

import logging
import sys

from omegaconf import DictConfig, OmegaConf

from unlearn_exp.errors import UserError

log = logging.getLogger("unlearn_exp")


def run_guarded(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; a ``UserError`` becomes one line on stderr and exit status 2."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def _run_stage(cfg: DictConfig):
    if cfg.stage == "compose":
        print(OmegaConf.to_yaml(cfg, resolve=True))
        return None
    if cfg.stage == "cell":
        from unlearn_exp.cell import run_cell

        return run_cell(cfg)
    raise UserError(f"unknown stage '{cfg.stage}': choose compose or cell")


def run_job(cfg: DictConfig):
    return run_guarded(_run_stage, cfg)
