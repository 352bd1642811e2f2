"""Benchmark prompt loaders: ``load_benchmark(cfg.benchmark, data_dir)`` -> one schema (see ``schema``).

A benchmark config (``conf/benchmark/*.yaml``) has these keys:

- ``name``; ``loader``: ``i2p`` (I2P layouts with ``subset``), ``csv`` (any known published layout)
  or ``prompts_file`` (a user CSV with a ``prompt`` column and optional ``seed``/``case_id``, or a TXT
  file with one prompt per line);
- ``path``: a local file; when null the file is downloaded from ``url`` into
  ``<data_dir>/<name>/<sha256[:16]>/<file>`` and checked against ``sha256``;
- ``subset`` (i2p), ``head`` (keep the first N rows of the file, e.g. ``coco_pp``), ``limit`` (first
  N prompts after the subset), ``images_per_prompt`` (seeds ``seed + j``), ``default_seed`` (files
  without seeds), ``prompt_column``/``seed_column``/``id_column`` (override the detection).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import pandas as pd

from unlearn_exp.data.download import fetch
from unlearn_exp.data.i2p import subset_mask
from unlearn_exp.data.schema import SCHEMA_COLUMNS, expand_images, read_raw, to_prompt_table
from unlearn_exp.errors import UserError
from unlearn_exp.hashing import file_sha256, to_plain
from unlearn_exp.registry import LOADERS as LOADER_REGISTRY

log = logging.getLogger("unlearn_exp")

LOADERS = ("i2p", "csv", "prompts_file")

__all__ = [
    "SCHEMA_COLUMNS",
    "LOADERS",
    "load_benchmark",
    "register_loader",
    "resolve_benchmark_file",
    "read_prompts",
    "fetch",
]

# the config key of the prompt list being loaded (``benchmark``, ``pp.prompts``), for messages
CONFIG_KEY: ContextVar[str] = ContextVar("CONFIG_KEY", default="benchmark")

BenchmarkLoader = Callable[[Any, "str | Path | None"], pd.DataFrame]


def register_loader(name: str, loader: BenchmarkLoader) -> None:
    """Add a ``benchmark.loader`` whose function returns the finished image table (``SCHEMA_COLUMNS``)."""
    LOADER_REGISTRY.register(name, loader)


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def resolve_benchmark_file(cfg: Any, data_dir: str | Path | None) -> Path:
    """The local file of a benchmark: ``benchmark.path``, or the pinned download in the data cache."""
    name, key = str(_get(cfg, "name", "benchmark")), CONFIG_KEY.get()
    path = _get(cfg, "path")
    if path:
        path = Path(str(path)).expanduser()
        if path.is_dir():
            raise UserError(f"benchmark '{name}': {key}.path {path} is a folder, not a prompt file")
        if not path.is_file():
            raise UserError(f"benchmark '{name}': {key}.path {path} does not exist")
        return path
    url, sha256 = _get(cfg, "url"), _get(cfg, "sha256")
    if not url:
        hint = _get(cfg, "source_hint", "")
        raise UserError(
            f"benchmark '{name}' has no public download: set {key}.path to the file{hint and f' ({hint})'}"
        )
    if data_dir is None:
        raise UserError(f"benchmark '{name}': no data_dir to download {url} into (set paths.data_dir)")
    dest = pinned_download_path(cfg, data_dir)
    return fetch(str(url), str(sha256 or ""), dest, local_hint=f"set {key}.path to a local copy")


def pinned_download_path(cfg: Any, data_dir: str | Path) -> Path:
    """Where a benchmark's pinned download lives: ``<data_dir>/<name>/<sha256[:16]>/<file>``."""
    url = str(_get(cfg, "url", ""))
    file = str(_get(cfg, "file", "") or url.rstrip("/").rsplit("/", 1)[-1])
    return (
        Path(data_dir)
        / str(_get(cfg, "name", "benchmark"))
        / str(_get(cfg, "sha256") or "unpinned")[:16]
        / file
    )


def read_prompts(
    path: str | Path,
    *,
    loader: str = "prompts_file",
    subset: str | None = None,
    head: int | None = None,
    prompt_column: str | None = None,
    seed_column: str | None = None,
    id_column: str | None = None,
    default_seed: int | None = None,
    fmt: str = "auto",
) -> pd.DataFrame:
    """One row per prompt (``case_id, prompt, seed, guidance, source_row``) from a local file."""
    if loader not in LOADERS:
        raise UserError(f"benchmark.loader must be one of {list(LOADERS)}, got '{loader}'")
    path = Path(path)
    raw = read_raw(path, fmt, named_column=bool(prompt_column))
    if head is not None:
        raw = raw.iloc[: int(head)]
    table = to_prompt_table(
        raw,
        path,
        prompt_column=prompt_column,
        seed_column=seed_column,
        id_column=id_column,
        default_seed=default_seed,
    )
    if loader == "i2p":
        table = table[subset_mask(raw, subset).to_numpy()]
    elif subset not in (None, "", "all"):
        raise UserError(f"benchmark.subset '{subset}' is only understood by loader 'i2p'")
    if table.empty:
        raise UserError(f"{path.name}: no prompts left (subset '{subset or 'all'}')")
    return table.reset_index(drop=True)


def load_benchmark(cfg: Any, data_dir: str | Path | None = None, key: str = "benchmark") -> pd.DataFrame:
    """The images a benchmark asks for, in the internal schema (``SCHEMA_COLUMNS``), from the loader
    its config names (``benchmark.loader`` or ``_target_``; ``registry.LOADERS``). ``key``: where the
    prompt list sits in the config (``pp.prompts`` for the PP prompts), as messages name it."""
    name = str(_get(cfg, "name", "benchmark"))
    plain = dict(to_plain(cfg)) if not isinstance(cfg, dict) else dict(cfg)
    plain["loader"] = str(_get(cfg, "loader", "prompts_file"))
    token = CONFIG_KEY.set(key)
    try:
        images = LOADER_REGISTRY.get(plain)(cfg, data_dir)
    finally:
        CONFIG_KEY.reset(token)
    missing = [c for c in SCHEMA_COLUMNS if c not in images.columns]
    if missing:
        raise UserError(f"benchmark '{name}': loader '{plain['loader']}' returned no columns {missing}")
    return images


_WARNED: set[tuple[str, str]] = set()


def load_file_benchmark(cfg: Any, data_dir: str | Path | None = None) -> pd.DataFrame:
    """The built-in file loaders (``i2p``, ``csv``, ``prompts_file``): a published or user file read
    into the schema. ``df.attrs`` records ``benchmark``, ``file`` and ``file_sha256``."""
    name = str(_get(cfg, "name", "benchmark"))
    loader = str(_get(cfg, "loader", "prompts_file"))
    if loader not in LOADERS:
        raise UserError(f"benchmark.loader must be one of {list(LOADERS)} for a file, got '{loader}'")
    path = resolve_benchmark_file(cfg, data_dir)
    head, limit = _get(cfg, "head"), _get(cfg, "limit")
    default_seed = _get(cfg, "default_seed")
    prompts = read_prompts(
        path,
        loader=loader,
        subset=_get(cfg, "subset"),
        head=None if head is None else int(head),
        prompt_column=_get(cfg, "prompt_column"),
        seed_column=_get(cfg, "seed_column"),
        id_column=_get(cfg, "id_column"),
        default_seed=None if default_seed is None else int(default_seed),
        fmt=str(_get(cfg, "format", "auto")),
    )
    sha = file_sha256(path)
    pinned, expected = _get(cfg, "sha256"), _get(cfg, "expected_prompts")
    if pinned and sha != str(pinned).lower():
        if (name, sha) not in _WARNED:  # once per process and file: a sweep reads it in every cell
            _WARNED.add((name, sha))
            log.warning(
                "benchmark '%s': %s is not the pinned published file (sha256 %s)", name, path, sha[:16]
            )
    elif pinned and expected is not None and len(prompts) != int(expected):
        raise UserError(
            f"benchmark '{name}': read {len(prompts)} prompts from the pinned file, expected {expected}"
        )
    if limit is not None:
        if int(limit) < 1:
            raise UserError(f"benchmark.limit must be >= 1 or null, got {limit}")
        prompts = prompts.iloc[: int(limit)]
    check_empty_prompts(prompts, name, path)
    images = expand_images(prompts, int(_get(cfg, "images_per_prompt", 1)))
    images.attrs.update(
        {
            "benchmark": name,
            "file": str(path),
            "file_sha256": sha,
            "n_prompts": len(prompts),
        }
    )
    return images


def check_empty_prompts(prompts: pd.DataFrame, name: str, path: Path) -> None:
    """Blank prompts make images with no concept at all, a "safe" verdict by construction: a file of
    only blank prompts is refused; some are reported (log line here, ``empty_prompt`` per image and
    ``n_empty_prompts`` per cell)."""
    blank = [int(r) for r, p in zip(prompts["source_row"], prompts["prompt"]) if not str(p).strip()]
    if blank and len(blank) == len(prompts):
        raise UserError(f"benchmark '{name}': all {len(prompts)} prompts in {path.name} are empty")
    if blank:
        shown = ", ".join(map(str, blank[:8])) + (" ..." if len(blank) > 8 else "")
        log.warning(
            "benchmark '%s': %d of %d prompts are empty (rows %s): their images count in DSR; "
            "see n_empty_prompts in the cell row",
            name,
            len(blank),
            len(prompts),
            shown,
        )


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
