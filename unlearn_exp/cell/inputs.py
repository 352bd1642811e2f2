"""What a cell reads: the model (imported on first use), the artifact store, the prompt rows, the
methods' own filters, and the unlearned checkpoint applied to a model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from unlearn_exp.checks import PICKLE_SUFFIXES
from unlearn_exp.paths import resolve_local_path
from unlearn_exp.settings import declared
from unlearn_exp.store import ArtifactStore

if TYPE_CHECKING:
    from unlearn_exp.models import Components


def load_model(model_cfg) -> Components:
    """``models.load_model``, imported on first use: a cell whose result is recorded imports neither
    diffusers nor transformers (the demo's rerun)."""
    from unlearn_exp.models import load_model as load

    return load(model_cfg)


def cell_store(cfg) -> ArtifactStore:
    """The artifact store a cell reads and writes: ``paths.cache_dir`` over the shipped caches."""
    shipped = [resolve_local_path(str(p)) for p in (cfg.paths.get("shipped_caches") or [])]
    return ArtifactStore(cfg.paths.cache_dir, shipped=shipped, verify=str(cfg.paths.get("verify", "small")))


def benchmark_rows(
    bench_cfg, data_dir, key: str = "benchmark"
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from unlearn_exp.data import load_benchmark

    df = load_benchmark(bench_cfg, data_dir, key)
    rows = df.to_dict("records")
    for r in rows:
        r["seed"] = int(r["seed"])
        r["image_index"] = int(r["image_index"])
        r["guidance"] = None if pd.isna(r.get("guidance")) else float(r["guidance"])
    return rows, dict(df.attrs)


def convert_pickles(checkpoint_cfg, store: ArtifactStore) -> None:
    """A pickled ``checkpoint.path`` allowed by ``allow_pickle_conversion``, converted into the cache
    (tensors only) before the model loads, so a file holding code is refused in seconds; the loader
    then finds the conversion. Folders are left to their loaders."""
    paths = checkpoint_cfg.get("path")
    if not paths or not checkpoint_cfg.get("allow_pickle_conversion"):
        return

    if getattr(declared("checkpoint").get(checkpoint_cfg.get("method")), "LOADS_FOLDERS", False):
        return  # a folder: its loader reads (and converts) its files
    from unlearn_exp.unlearning.weights import resolve_weight_file

    for p in [paths] if isinstance(paths, str) else list(paths):
        if Path(str(p)).expanduser().suffix in PICKLE_SUFFIXES:
            resolve_weight_file(p, store, allow_pickle_conversion=True)


def method_filter(filter_cfg):
    """The judge profile a method filters its training data with (``checkpoint.filter``,
    ``inversion.image_set.filter``), or None; the evaluation judge never enters here."""
    if not filter_cfg:
        return None
    from unlearn_exp.evaluation.judge import make_judge

    return make_judge(filter_cfg)


def apply_unlearning(cfg, comps: Components, store: ArtifactStore, checkpoint_cfg, logger) -> dict[str, Any]:
    from unlearn_exp.unlearning.checkpoints import apply_checkpoint  # refuses a method nobody registered

    return apply_checkpoint(
        comps,
        checkpoint_cfg,
        store,
        task_cfg=cfg.task,
        judge=method_filter(checkpoint_cfg.get("filter")),  # the method's filter, not cfg.judge
        sample_kwargs=None,
        logger=logger,
    )
