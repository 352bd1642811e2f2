"""``python -m unlearn_exp.report --judges A,B``: the recorded cells' DSR under several judge profiles.

Papers of this field report nudity DSR under different judges (DUO's four NudeNet classes; the nine
``*_EXPOSED`` classes at 0.45 or 0.6: docs/methods.md 7.2), so a number is comparable only with its
judge named. This re-judges the images each cell already made (no resampling: the paths and sha256
in ``images.parquet``; an image that is missing or changed stops the report naming it) with each
profile (a ``conf/judge`` option), and gives per cell the DSR with its Wilson interval under each
judge and Cohen's kappa between each pair of judges' unsafe flags:

    kappa = (p_o - p_e) / (1 - p_e),  p_o = share of images both call alike,
    p_e = p_a p_b + (1 - p_a)(1 - p_b)  (p_x: the share judge x calls unsafe)

With both judges calling every image alike and one class only (p_e = 1), kappa is 1.0. Where a
requested profile is the cell's own judge (same profile hash), its verdicts must equal the recorded
ones; ``reproduced`` says whether they do.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from unlearn_exp.atomic import atomic_write_text
from unlearn_exp.config import compose
from unlearn_exp.errors import UserError
from unlearn_exp.evaluation.dsr import dsr
from unlearn_exp.hashing import file_sha256
from unlearn_exp.report.tables import load_cells

KEY_COLUMNS = ["experiment", "checkpoint_label", "guidance", "embedding", "benchmark"]


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Cohen's kappa of two judges' flags on the same images (NaN for no images)."""
    if len(a) != len(b):
        raise ValueError(f"kappa needs flags of the same images: {len(a)} against {len(b)}")
    n = len(a)
    if n == 0:
        return math.nan
    p_o = sum(x == y for x, y in zip(a, b, strict=True)) / n
    p_a, p_b = sum(map(bool, a)) / n, sum(map(bool, b)) / n
    p_e = p_a * p_b + (1 - p_a) * (1 - p_b)
    if p_e >= 1.0:
        return 1.0 if p_o >= 1.0 else math.nan
    return (p_o - p_e) / (1 - p_e)


def _judge(name: str, overrides: Sequence[str]):
    from unlearn_exp.evaluation.judge import make_judge

    return make_judge(compose([*overrides, f"judge={name}"]).judge)


def recorded_images(cell: pd.Series, split: str = "bench") -> pd.DataFrame:
    """The cell's images of ``split`` (``bench``: the benchmark; ``coco``: the benign PP prompts), from
    the ``images.parquet`` beside its ``cells.parquet``, each checked against its recorded sha256."""
    from unlearn_exp.evaluation.records import read_table

    table = Path(cell["_source"]).with_name("images.parquet")
    if not table.is_file():
        raise UserError(f"cell {cell['cell_key']}: no image rows beside {cell['_source']}")
    rows = read_table(table)
    rows = rows[(rows["cell_key"] == cell["cell_key"]) & (rows["split"] == split)]
    rows = rows.sort_values(["case_id", "image_index"]).reset_index(drop=True)
    for path, sha in zip(rows["image_path"], rows["image_sha256"], strict=True):
        if not Path(path).is_file():
            raise UserError(f"cell {cell['cell_key']}: image {path} is missing (re-run the cell)")
        if file_sha256(path) != sha:
            raise UserError(f"cell {cell['cell_key']}: image {path} changed since it was judged")
    return rows


def judges_table(
    results: Sequence[str | Path], profiles: Sequence[str], overrides: Sequence[str] = ()
) -> pd.DataFrame:
    """One row per recorded cell: DSR (and interval) under each profile, kappa per pair of profiles,
    and whether a profile equal to the cell's own judge reproduced its recorded verdicts."""
    from PIL import Image

    if len(profiles) < 1 or len(set(profiles)) != len(profiles):
        raise UserError(f"--judges needs distinct judge profiles, got {list(profiles)}")
    cells = load_cells(results, strict=True)  # a recorded row that contradicts itself is an error here
    if cells.empty:
        raise UserError(f"no recorded cells under {', '.join(map(str, results))}")
    judges = {name: _judge(name, overrides) for name in profiles}
    out = []
    for _, cell in cells.sort_values(KEY_COLUMNS, na_position="last").iterrows():
        images = recorded_images(cell)
        pil = [Image.open(p).convert("RGB") for p in images["image_path"]]
        row = {"cell_key": cell["cell_key"], **{k: cell.get(k) for k in KEY_COLUMNS}, "n": len(pil)}
        row["recorded_judge"] = cell["judge_profile"]
        unsafe: dict[str, list[bool]] = {}
        reproduced = []
        for name, judge in judges.items():
            safe = [bool(v["safe"]) for v in judge.judge(pil)]
            unsafe[name] = [not s for s in safe]
            d = dsr(safe)
            row |= {f"dsr[{name}]": d["dsr"], f"lo[{name}]": d["lo"], f"hi[{name}]": d["hi"]}
            if judge.profile["hash"] == cell["judge_hash"]:  # the verdicts and the row's own counts
                same = safe == [bool(s) for s in images["safe"]]
                reproduced.append(same and d["n_safe"] == cell["n_safe"] and d["n"] == cell["n_images"])
        for a, b in itertools.combinations(profiles, 2):
            row[f"kappa[{a},{b}]"] = cohen_kappa(unsafe[a], unsafe[b])
        row["reproduced"] = all(reproduced) if reproduced else None
        out.append(row)
    return pd.DataFrame(out)


def render_judges(table: pd.DataFrame, profiles: Sequence[str]) -> str:
    """The table as markdown: DSR [lo, hi] per judge, kappa per pair."""
    pairs = list(itertools.combinations(profiles, 2))
    head = ["checkpoint", "guidance", "embedding", "benchmark", "n"]
    head += [f"DSR {p}" for p in profiles] + [f"kappa {a} / {b}" for a, b in pairs] + ["recorded judge"]
    lines = [
        f"DSR under {len(profiles)} judge profiles, from the same images (no resampling); Cohen's kappa "
        "between the judges' unsafe flags per cell. 'recorded judge' is the cell's own; (re) where a "
        "requested profile is that judge and reproduced its recorded verdicts.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for _, r in table.iterrows():
        cells = [str(r["checkpoint_label"]), str(r["guidance"]), str(r["embedding"]), str(r["benchmark"])]
        cells.append(str(r["n"]))
        cells += [f"{r[f'dsr[{p}]']:.3f} [{r[f'lo[{p}]']:.2f}, {r[f'hi[{p}]']:.2f}]" for p in profiles]
        cells += [_fmt(r[f"kappa[{a},{b}]"]) for a, b in pairs]
        cells.append(str(r["recorded_judge"]) + (" (re)" if r["reproduced"] is True else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.2f}"


def write_judges(table: pd.DataFrame, profiles: Sequence[str], out_dir: str | Path) -> list[Path]:
    """``judges.md`` and ``judges.csv`` under ``out_dir``, each written atomically."""
    if table["reproduced"].eq(False).any():  # a wrong number is worse than none: nothing is written
        bad = table.loc[table["reproduced"].eq(False), "cell_key"].tolist()
        raise UserError(f"re-judging with a cell's own judge changed its verdicts: cells {bad}")
    out = Path(out_dir)
    md = atomic_write_text(out / "judges.md", render_judges(table, profiles))
    csv = atomic_write_text(out / "judges.csv", table.to_csv(index=False))
    return [md, csv]
