"""One grid cell: model -> unlearned checkpoint -> concept source -> guided sampling -> judge -> scores."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from unlearn_exp.errors import NotImplementedStage

log = logging.getLogger("unlearn_exp")


def run_cell(cfg: DictConfig):
    from unlearn_exp.models import load_model

    comps = load_model(cfg.model)
    log.info("loaded model %s from %s", comps.name, comps.source)
    if cfg.checkpoint.method != "original":
        raise NotImplementedStage(f"unlearning ({cfg.checkpoint.method})")
    raise NotImplementedStage("guided sampling")
