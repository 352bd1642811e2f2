"""Result tables: one row per image and one row per grid cell (issue item 4), written atomically.

``write_table(df, path)`` writes Parquet (``.parquet``) through a temporary file and rename, and a
CSV beside it (same stem) for quick reading; ``read_table(path)`` reads either. Dict and list cells
(judge raw output, configs) are stored as JSON text so both formats hold them.

Image rows (``IMAGE_COLUMNS``):
  cell_key, split (``bench`` or ``coco``: which prompt set), benchmark, case_id, source_row, prompt,
  empty_prompt (the prompt is blank: its image shows no concept by construction), truncated and
  n_tokens (the prompt was cut at CLIP's 77 tokens; tokens before the cut), seed, image_index,
  guidance_scale, image_path, image_sha256, judge_profile, judge_hash, safe,
  score, judge_raw (JSON), lpips (distance to the original model's image; NaN where not computed),
  benign_ok (PP-set images: whether the judge sees what the benign prompt asked for; None where the
  judge or the prompt set cannot tell), pp_profile, pp_hash.

Cell rows (``CELL_COLUMNS``):
  cell_key (what was computed: artifact identities), spec_key (what was asked: the hash of
  ``identity.cell_spec``, by which the report takes a table position's cell), experiment, task,
  scale (sd14, toy or tiny: the model config's name), model_id, checkpoint_method, beta (NaN for a
  checkpoint file given without an explicit beta), checkpoint_label, checkpoint_id, guidance,
  embedding, embedding_id, benchmark, benchmark_sha256, dsr, dsr_lo, dsr_hi (Wilson 95%),
  n_images, n_safe, n_truncated and n_empty_prompts (benchmark images whose prompt was cut at 77
  tokens, or blank), safree_compat and n_safree_compat_differs (SAFREE cells: fixed or official,
  and how many benchmark prompts the two modes condition differently beyond float tolerance), pp_coco,
  pp_bench, n_pp_coco, n_pp_bench, benign_acc (share of benign_ok, NaN
  where not measured), n_benign, flag (why benign fidelity counts as collapsed, "" otherwise: a
  "safe" verdict on a broken image is no defence), judge_profile, judge_hash, pp_profile, pp_hash,
  config_json (the resolved config), created_at.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from unlearn_exp.errors import UserError
from unlearn_exp.store import atomic_file

IMAGE_COLUMNS = [
    "cell_key",
    "split",
    "benchmark",
    "case_id",
    "source_row",
    "prompt",
    "empty_prompt",
    "truncated",
    "n_tokens",
    "seed",
    "image_index",
    "guidance_scale",
    "image_path",
    "reference_path",
    "image_sha256",
    "judge_profile",
    "judge_hash",
    "safe",
    "score",
    "judge_raw",
    "lpips",
    "benign_ok",
    "pp_profile",
    "pp_hash",
]

# what a cell is: the grid position and the identities of what produced it
CELL_IDENTITY = (
    "experiment",
    "task",
    "scale",
    "model_id",
    "checkpoint_method",
    "beta",
    "checkpoint_label",
    "checkpoint_id",
    "guidance",
    "embedding",
    "embedding_id",
)

CELL_COLUMNS = [
    "cell_key",
    "spec_key",
    *CELL_IDENTITY,
    "benchmark",
    "benchmark_sha256",
    "dsr",
    "dsr_lo",
    "dsr_hi",
    "n_images",
    "n_safe",
    "n_truncated",
    "n_empty_prompts",
    "safree_compat",
    "n_safree_compat_differs",
    "pp_coco",
    "pp_bench",
    "n_pp_coco",
    "n_pp_bench",
    "benign_acc",
    "n_benign",
    "flag",
    "judge_profile",
    "judge_hash",
    "pp_profile",
    "pp_hash",
    "spec_json",
    "config_json",
    "created_at",
]

JSON_COLUMNS = ("judge_raw", "spec_json", "config_json")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, sort_keys=True, default=str)
    return value


def make_rows(rows: Iterable[Mapping[str, Any]], columns: list[str]) -> pd.DataFrame:
    """A table with exactly ``columns`` (missing values None); unknown keys are an error."""
    rows = [dict(r) for r in rows]
    extra = sorted({k for r in rows for k in r} - set(columns))
    if extra:
        raise UserError(f"unknown result columns {extra}; the schema is {columns}")
    return pd.DataFrame([{c: _jsonable(r.get(c)) for c in columns} for r in rows], columns=columns)


def image_table(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    return make_rows(rows, IMAGE_COLUMNS)


def cell_table(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    return make_rows(rows, CELL_COLUMNS)


def write_table(df: pd.DataFrame, path: str | Path, *, csv: bool = True) -> Path:
    """Atomic Parquet at ``path`` (suffix ``.parquet`` added if absent), and ``<stem>.csv`` beside it."""
    path = Path(path)
    if path.suffix != ".parquet":
        path = path.with_suffix(".parquet")
    out = df.copy()
    for col in out.columns:
        if out[col].dtype == object:
            out[col] = out[col].map(_jsonable)
    with atomic_file(path) as tmp:
        out.to_parquet(tmp, index=False)
    if csv:
        with atomic_file(path.with_suffix(".csv")) as tmp:
            out.to_csv(tmp, index=False)
    return path


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a table written by ``write_table`` (Parquet, or the CSV beside it)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"result table not found: {path}")
    try:
        if path.suffix == ".csv":
            return pd.read_csv(path, keep_default_na=True, dtype={"case_id": str, "cell_key": str})
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow/pandas raise many types for a damaged file
        raise UserError(f"cannot read result table {path}: {str(exc).splitlines()[0]}") from None


def load_json_cell(value: Any) -> Any:
    """Parse a JSON column value back (``judge_raw``, ``config_json``); NaN/None stay None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return json.loads(value) if isinstance(value, str) else value
