"""What one Hydra job does, and how errors reach the user (one line, non-zero exit).

A cell or attack job prints its results, its progress and real warnings: once Hydra has set up the
job's logging, ``quiet.quiet_lightning`` keeps Lightning's info lines and tips out of it.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf, open_dict

from unlearn_exp.errors import UserError, run_guarded
from unlearn_exp.quiet import quiet_lightning

log = logging.getLogger("unlearn_exp")


def _command_line_overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:  # composed outside a Hydra app
        return []


def label_user_checkpoint(cfg: DictConfig, overrides: list[str]) -> None:
    """A checkpoint loaded from ``checkpoint.path`` is labelled with the beta the user gave on the
    command line (``checkpoint.beta=...``), never with the config's default beta."""
    if not cfg.checkpoint.get("path"):
        return
    given = [o.split("=", 1)[1] for o in overrides if o.lstrip("+~").startswith("checkpoint.beta=")]
    with open_dict(cfg), open_dict(cfg.checkpoint):  # a schema's node refuses new keys otherwise
        if cfg.checkpoint.get("beta_label") is None:
            cfg.checkpoint.beta_label = given[-1] if given else None
        if cfg.checkpoint.beta_label is not None:
            try:
                cfg.checkpoint.beta_label = float(cfg.checkpoint.beta_label)
            except ValueError:
                raise UserError(
                    f"checkpoint.beta must be a number, got '{cfg.checkpoint.beta_label}'"
                ) from None


def _run_stage(cfg: DictConfig):
    from unlearn_exp.schema import refuse_unknown_keys

    refuse_unknown_keys(cfg)  # before anything reads the config: a typo added with + is not ignored
    if cfg.stage == "compose":
        print(OmegaConf.to_yaml(cfg, resolve=True))
        return None
    if cfg.stage in ("cell", "attack"):
        quiet_lightning()  # after Hydra's logging setup: Lightning's records go through it, once
    if cfg.stage == "cell":
        from unlearn_exp.cell import run_cell

        label_user_checkpoint(cfg, _command_line_overrides())
        return run_cell(cfg)
    if cfg.stage == "attack":
        from unlearn_exp.attack import run_attack_cell

        label_user_checkpoint(cfg, _command_line_overrides())
        return run_attack_cell(cfg)
    raise UserError(f"unknown stage '{cfg.stage}': choose compose, cell or attack")


def run_job(cfg: DictConfig):
    return run_guarded(_run_stage, cfg)
