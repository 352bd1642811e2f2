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

from unlearn_exp.atomic import atomic_file
from unlearn_exp.errors import UserError
from unlearn_exp.evaluation.dsr import wilson_interval

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


# ----------------------------------------------------------------------------- recorded rows checked
TOL = 1e-6  # rates recomputed from their counts agree to float rounding
PP_TOL = 1e-5  # PP from per-image distances stored as float32


def _num(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def row_problems(row: Mapping[str, Any], images: pd.DataFrame | None = None) -> list[str]:
    """Where a recorded cell row contradicts itself or the image rows beside it: DSR is
    ``n_safe / n_images`` with its Wilson interval (``evaluation/dsr.py``), rates lie in [0, 1] and PP
    at most 1; with ``images``, the counts, the benchmark verdicts, PP (1 - mean distance per prompt
    set) and benign accuracy are recomputed from them. Columns a row lacks are not checked."""
    out: list[str] = []
    dsr, lo, hi, n, k = (_num(row.get(c)) for c in ("dsr", "dsr_lo", "dsr_hi", "n_images", "n_safe"))
    for name in ("dsr", "dsr_lo", "dsr_hi", "benign_acc"):
        v = _num(row.get(name))
        if v is not None and not -TOL <= v <= 1 + TOL:
            out.append(f"{name} {v:g} outside [0, 1]")
    for name in ("pp_coco", "pp_bench"):  # 1 - a mean distance, distances >= 0
        v = _num(row.get(name))
        if v is not None and v > 1 + TOL:
            out.append(f"{name} {v:g} above 1")
    if n is not None and k is not None:
        if not (n >= 0 and 0 <= k <= n and n.is_integer() and k.is_integer()):
            out.append(f"n_safe {k:g} of n_images {n:g} is not a count")
        elif n > 0:
            if dsr is None or abs(dsr - k / n) > TOL:
                out.append(f"dsr {dsr} is not n_safe/n_images = {k:.0f}/{n:.0f}")
            w_lo, w_hi = wilson_interval(int(k), int(n))
            if lo is None or hi is None or abs(lo - w_lo) > TOL or abs(hi - w_hi) > TOL:
                out.append(f"interval [{lo}, {hi}] is not the Wilson interval of {k:.0f}/{n:.0f}")
    elif None not in (dsr, lo, hi) and not lo - TOL <= dsr <= hi + TOL:
        out.append(f"dsr {dsr:g} outside its interval [{lo:g}, {hi:g}]")
    if images is not None:
        out += _image_problems(row, images, n, k)
    return out


def _image_problems(row: Mapping[str, Any], images: pd.DataFrame, n, k) -> list[str]:
    out = []
    if "cell_key" in images.columns:
        images = images[images["cell_key"].astype(str) == str(row.get("cell_key"))]
    bench = images[images["split"] == "bench"]
    if n is not None and len(bench) != n:
        out.append(f"n_images {n:.0f} but {len(bench)} benchmark image rows")
    flags = [bool(s) for s in bench["safe"] if s is not None and s == s]
    if k is not None and len(flags) == len(bench) and sum(flags) != k:
        out.append(f"n_safe {k:.0f} but {sum(flags)} benchmark images judged safe")
    for split in ("coco", "bench"):
        value, count = _num(row.get(f"pp_{split}")), _num(row.get(f"n_pp_{split}"))
        d = pd.to_numeric(images.loc[images["split"] == split, "lpips"], errors="coerce").dropna()
        if count is not None and count != len(d):
            out.append(f"n_pp_{split} {count:.0f} but {len(d)} image distances")
        if value is not None and (d.empty or abs((1 - float(d.mean())) - value) > PP_TOL):
            out.append(f"pp_{split} {value:.4f} is not 1 - mean distance of its images")
    oks = [bool(o) for o in images["benign_ok"] if o is not None and o == o]
    acc, n_benign = _num(row.get("benign_acc")), _num(row.get("n_benign"))
    if n_benign is not None and n_benign != len(oks):
        out.append(f"n_benign {n_benign:.0f} but {len(oks)} benign verdicts")
    if acc is not None and (not oks or abs(acc - sum(oks) / len(oks)) > TOL):
        out.append(f"benign_acc {acc:.4f} is not the share of benign verdicts")
    return out
