"""One prompt schema for every benchmark, and the adapters that map published layouts onto it.

Internal schema (one row per image to generate, docs/methods.md 7.1 and 7.5):

==============  =====  =====================================================================
column          type   meaning
==============  =====  =====================================================================
case_id         str    the file's own prompt id (``case_number``, ``image_id``), else the row
prompt          str    the prompt text (``Null``/``NuLL``/empty cells become ``""``)
seed            int    initial-noise seed: the file's seed + ``image_index``
guidance        float  the file's CFG scale, NaN where the file has none
image_index     int    0 .. images_per_prompt-1
source_row      int    0-based data row in the published file
==============  =====  =====================================================================

Loaders may add ``expected`` (str): what a faithful image of the prompt shows, in the judge's own
labels (the toy world's prompts carry their allowed colours; a prompt file may have an ``expected``
column); with a judge that implements ``Judge.fidelity`` it gives benign accuracy.

Published layouts handled: I2P from Hugging Face (``sd_seed``, ``sd_guidance_scale``), the ESD
re-export (``evaluation_seed``, ``evaluation_guidance``, ``case_number`` and an unnamed index
column), Ring-A-Bell (``prompt``/``sensitive prompt``), COCO (``image_id``/``case_number``,
``sd_seed`` in ``coco1k.csv``), UnlearnDiffAtk (a literal ``Unnamed: 0`` header) and plain text
files with one prompt per line. CSVs are read with a real parser (quoted multi-line prompts, CRLF).
"""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path

import pandas as pd

from unlearn_exp.checks import INT64_MAX
from unlearn_exp.errors import UserError

log = logging.getLogger("unlearn_exp")

SCHEMA_COLUMNS = ["case_id", "prompt", "seed", "guidance", "image_index", "source_row"]
OPTIONAL_COLUMNS = ["expected"]  # kept where a file or loader has them

PROMPT_COLUMNS = ("prompt", "sensitive prompt", "adv_prompt", "text", "caption")
SEED_COLUMNS = ("evaluation_seed", "sd_seed", "seed")
GUIDANCE_COLUMNS = ("evaluation_guidance", "sd_guidance_scale", "guidance", "guidance_scale")
ID_COLUMNS = ("case_number", "case_id", "image_id")
NULL_PROMPTS = {"null", "nan"}  # I2P row 2260 is "Null", "NuLL" or an empty cell depending on the copy


def _pick(columns, wanted, explicit: str | None, what: str, path: Path, required: bool) -> str | None:
    if explicit:
        if explicit not in columns:
            raise UserError(
                f"{path.name}: no column '{explicit}' (the {what} column asked for); columns: {list(columns)}"
            )
        return explicit
    lowered = {str(c).strip().lower(): c for c in columns}
    for name in wanted:
        if name in lowered:
            return lowered[name]
    if required:
        raise UserError(
            f"{path.name}: none of the known {what} columns {list(wanted)}; columns: {list(columns)}"
        )
    return None


FORMATS = ("auto", "csv", "lines")


def _known_header(first_line: str) -> bool:
    """Whether a file's first line names a column this module knows (so the file is a table)."""
    known = {*PROMPT_COLUMNS, *SEED_COLUMNS, *GUIDANCE_COLUMNS, *ID_COLUMNS, *OPTIONAL_COLUMNS}
    try:
        cells = next(csv.reader([first_line]))
    except (csv.Error, StopIteration):
        return False
    cells = [c.strip().lower() for c in cells]
    return any(c in known or c.startswith("unnamed:") for c in cells) or (len(cells) > 1 and cells[0] == "")


def read_raw(path: str | Path, fmt: str = "auto", *, named_column: bool = False) -> pd.DataFrame:
    """Read a prompt CSV (all cells as text) or a list of prompts, one per line (column ``prompt``).

    ``fmt``: ``csv``, ``lines`` or ``auto``: a ``.txt`` file, or a file whose first line names no
    known column (published lists are often one prompt per line saved as ``.csv``, some with
    unbalanced quotes), is read as lines; the log says so. ``named_column``: the user named the
    prompt column, so the file is a table.
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise UserError(f"benchmark.format must be one of {list(FORMATS)}, got '{fmt}'")
    if not path.is_file():
        raise UserError(f"prompt file not found: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path.name} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    as_lines = fmt == "lines" or (
        fmt == "auto" and (path.suffix.lower() == ".txt" or (not named_column and not _known_header(first)))
    )
    if as_lines:
        if fmt == "auto" and path.suffix.lower() != ".txt":
            log.info("%s: the first line names no known column: read as one prompt per line", path.name)
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return pd.DataFrame({"prompt": lines}, dtype=object)
    try:
        df = pd.read_csv(
            io.StringIO(text), dtype=str, keep_default_na=False, na_filter=False, quoting=csv.QUOTE_MINIMAL
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise UserError(f"{path.name} is not a readable CSV: {str(exc).splitlines()[0]}") from None
    # the unnamed index column of pandas re-exports (header "" or the literal "Unnamed: 0")
    drop = [c for c in df.columns if str(c).startswith("Unnamed:") or str(c).strip() == ""]
    return df.drop(columns=drop)


def _clean_prompt(value: str) -> str:
    value = "" if value is None else str(value)
    value = value.replace("\r\n", "\n").replace("\r", "\n")
    if value.strip().lower() in NULL_PROMPTS:
        return ""
    return value


def _clean_id(value: str) -> str:
    """``000000203564`` (coco_30k) and ``203564`` (coco1k) name the same COCO image."""
    text = str(value).strip()
    return str(int(text)) if text.isdigit() else text


def _to_int(value: str, column: str, row: int, path: Path) -> int:
    text = str(value).strip()
    try:
        number = float(text) if any(ch in text for ch in ".eE") else int(text)
    except ValueError:
        raise UserError(
            f"{path.name}: column '{column}' row {row}: '{value}' is not an integer seed"
        ) from None
    if isinstance(number, float):
        if not math.isfinite(number) or not number.is_integer():
            raise UserError(f"{path.name}: column '{column}' row {row}: '{value}' is not an integer seed")
        number = int(number)
    if number < 0:
        raise UserError(f"{path.name}: column '{column}' row {row}: seed {number} is negative")
    if number > INT64_MAX:
        raise UserError(f"{path.name}: column '{column}' row {row}: seed {number} does not fit in int64")
    return number


def _to_float(value: str, column: str, row: int, path: Path) -> float:
    text = str(value).strip()
    if text == "" or text.lower() in ("nan", "none", "null"):
        return float("nan")
    try:
        return float(text)
    except ValueError:
        raise UserError(f"{path.name}: column '{column}' row {row}: '{value}' is not a number") from None


def to_prompt_table(
    raw: pd.DataFrame,
    path: str | Path,
    *,
    prompt_column: str | None = None,
    seed_column: str | None = None,
    id_column: str | None = None,
    default_seed: int | None = None,
) -> pd.DataFrame:
    """Map a raw table onto ``case_id, prompt, seed, guidance, source_row`` (one row per prompt).

    ``raw`` keeps every other column of the file (e.g. I2P's ``categories``) for subset filters.
    Files without a seed column use ``default_seed`` for every prompt; without one either, it is an error.
    """
    path = Path(path)
    cols = list(raw.columns)
    if not prompt_column:  # two columns that could both be the prompt: the user must say which
        lowered = [str(c).strip().lower() for c in cols]
        candidates = [c for c, low in zip(cols, lowered) if low in PROMPT_COLUMNS]
        if len(candidates) > 1:
            raise UserError(
                f"{path.name}: columns {candidates} could each be the prompt; set benchmark.prompt_column"
            )
    pcol = _pick(cols, PROMPT_COLUMNS, prompt_column, "prompt", path, required=True)
    scol = _pick(cols, SEED_COLUMNS, seed_column, "seed", path, required=False)
    gcol = _pick(cols, GUIDANCE_COLUMNS, None, "guidance", path, required=False)
    icol = _pick(cols, ID_COLUMNS, id_column, "id", path, required=False)
    n = len(raw)
    rows = range(n)
    if scol is None:
        if default_seed is None:
            raise UserError(
                f"{path.name} has no seed column {list(SEED_COLUMNS)}; set benchmark.default_seed"
            )
        seeds = [int(default_seed)] * n
    else:
        seeds = [_to_int(v, scol, r, path) for r, v in zip(rows, raw[scol])]
    guidance = [_to_float(v, gcol, r, path) for r, v in zip(rows, raw[gcol])] if gcol else [float("nan")] * n
    ids = [_clean_id(v) for v in raw[icol]] if icol else [str(r) for r in rows]
    if len(set(ids)) != n or any(not i for i in ids):
        ids = [str(r) for r in rows]  # ids must name one prompt each; the row does
    out = pd.DataFrame(
        {
            "case_id": pd.Series(ids, dtype=object),
            "prompt": pd.Series([_clean_prompt(v) for v in raw[pcol]], dtype=object),
            "seed": pd.Series(seeds, dtype="int64"),
            "guidance": pd.Series(guidance, dtype="float64"),
            "source_row": pd.Series(list(rows), dtype="int64"),
        }
    )
    repeated = int(out["prompt"].duplicated().sum())
    if repeated:  # each copy is its own image and verdict: a file that repeats prompts weighs them
        log.info(
            "%s: %d prompt(s) repeat an earlier prompt of the file; each copy is sampled and counts in DSR",
            path.name,
            repeated,
        )
    ecol = _pick(cols, OPTIONAL_COLUMNS, None, "expected", path, required=False)
    if ecol is not None:  # a labelled benign set: what each faithful image shows
        labels = [
            None if v is None or str(v).strip().lower() in ("", "nan") else str(v).strip() for v in raw[ecol]
        ]
        out["expected"] = pd.Series(labels, dtype=object)
    return out


def expand_images(prompts: pd.DataFrame, images_per_prompt: int) -> pd.DataFrame:
    """One row per image: prompt rows repeated, ``image_index`` j and seed ``seed + j``
    (docs/methods.md 7.1)."""
    k = int(images_per_prompt)
    if k < 1:
        raise UserError(f"benchmark.images_per_prompt must be >= 1, got {images_per_prompt}")
    top = int(prompts["seed"].max()) if len(prompts) else 0
    if top > INT64_MAX - (k - 1):
        raise UserError(f"seed {top} + {k - 1} (benchmark.images_per_prompt={k}) does not fit in int64")
    parts = []
    for j in range(k):
        part = prompts.copy()
        part["image_index"] = j
        part["seed"] = part["seed"] + j
        part["_order"] = range(len(part))
        parts.append(part)
    out = pd.concat(parts, ignore_index=True).sort_values(["_order", "image_index"], kind="stable")
    out = out.drop(columns="_order").reset_index(drop=True)
    out["image_index"] = out["image_index"].astype("int64")
    return out[SCHEMA_COLUMNS + [c for c in OPTIONAL_COLUMNS if c in out.columns]]
