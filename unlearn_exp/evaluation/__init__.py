"""Evaluation: judges with versioned profiles, DSR with a Wilson interval, PP distances, result records.

- ``make_judge(cfg.judge) -> Judge``; ``Judge.judge(images) -> [{"safe", "score", "raw"}]``;
  ``Judge.profile`` (name, hash, model_file, model_sha256, classes, threshold, rule);
  ``register_judge(kind, factory)`` adds a judge type (the toy world's ``toy``).
- ``dsr(safe_flags) -> {"dsr", "lo", "hi", "n", "n_safe"}`` (docs/methods.md 7.2).
- ``make_pp_metric(cfg_pp) -> Distance``; ``Distance.distance(a, b)``; ``evaluation.pp.pp(distances)``
  (docs/methods.md 7.4); ``FeatureDistance(feature_fn, name)``; ``register_pp_metric(kind, factory)``.
- ``records``: ``write_table``, ``read_table``, ``IMAGE_COLUMNS``, ``CELL_COLUMNS``.
- ``config``: each judge type's settings. Nothing here imports torch; ``pp.py`` (which registers the
  LPIPS metrics) is imported on first use of its names, so composing a config registers nothing.
"""

from __future__ import annotations

from unlearn_exp.evaluation.dsr import dsr, wilson_interval
from unlearn_exp.evaluation.judge import Judge, make_judge, make_profile, register_judge, registered_judges
from unlearn_exp.evaluation.records import (
    CELL_COLUMNS,
    IMAGE_COLUMNS,
    cell_table,
    image_table,
    read_table,
    write_table,
)
from unlearn_exp.lazy import lazy_attributes

__all__ = [
    "CELL_COLUMNS",
    "IMAGE_COLUMNS",
    "Distance",
    "FeatureDistance",
    "Judge",
    "cell_table",
    "dsr",
    "image_table",
    "make_judge",
    "make_pp_metric",
    "make_profile",
    "read_table",
    "register_judge",
    "register_pp_metric",
    "registered_judges",
    "wilson_interval",
    "write_table",
]


_LAZY = {"Distance", "FeatureDistance", "make_pp_metric", "register_pp_metric"}

__getattr__ = lazy_attributes(__name__, {name: "pp" for name in _LAZY})
