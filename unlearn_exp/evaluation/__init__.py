"""Evaluation: judges with versioned profiles, DSR with a Wilson interval, PP distances, result records.

- ``make_judge(cfg.judge) -> Judge``; ``Judge.judge(images) -> [{"safe", "score", "raw"}]``;
  ``Judge.profile`` (name, hash, model_file, model_sha256, classes, threshold, rule);
  ``register_judge(kind, factory)`` adds a judge type (the toy world's ``toy``).
- ``dsr(safe_flags) -> {"dsr", "lo", "hi", "n", "n_safe"}`` (docs/methods.md 7.2).
- ``make_pp_metric(cfg_pp) -> Distance``; ``Distance.distance(a, b)``; ``evaluation.pp.pp(distances)``
  (docs/methods.md 7.4); ``FeatureDistance(feature_fn, name)``; ``register_pp_metric(kind, factory)``.
- ``records``: ``write_table``, ``read_table``, ``IMAGE_COLUMNS``, ``CELL_COLUMNS``.
- ``config``: each judge type's settings. Judges, result tables and PP metrics are imported on first
  use of their names, so composing a config (which imports ``config``) loads none of them.
"""

from __future__ import annotations

from unlearn_exp.evaluation.dsr import dsr, wilson_interval  # the function shadows its module
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


# imported on first use (PEP 562): importing the package (as composing a config does, through
# ``config``) loads neither the judges, the result tables nor the artifact store
_WHERE = {
    **dict.fromkeys(["Judge", "make_judge", "make_profile", "register_judge", "registered_judges"], "judge"),
    **dict.fromkeys(
        ["CELL_COLUMNS", "IMAGE_COLUMNS", "cell_table", "image_table", "read_table", "write_table"], "records"
    ),
    **dict.fromkeys(["Distance", "FeatureDistance", "make_pp_metric", "register_pp_metric"], "pp"),
}

__getattr__ = lazy_attributes(__name__, _WHERE)
