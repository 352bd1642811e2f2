"""What one Hydra job does, and how errors reach the user (one line, non-zero exit)."""

from __future__ import annotations

import logging
import sys

from omegaconf import DictConfig, OmegaConf

from unlearn_exp.errors import UserError

log = logging.getLogger("unlearn_exp")


def run_job(cfg: DictConfig):
    try:
        if cfg.stage == "compose":
            print(OmegaConf.to_yaml(cfg, resolve=True))
            return None
        if cfg.stage == "cell":
            from unlearn_exp.cell import run_cell

            return run_cell(cfg)
        raise UserError(f"unknown stage '{cfg.stage}': choose compose or cell")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
