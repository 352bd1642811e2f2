"""``python -m unlearn_exp.report --utility A,B``: utility metrics of the benign images every recorded
cell already made (no resampling; docs/methods.md 7.6): CLIP score, FID, KID, or the toy's analogues.

Each metric is a ``conf/utility`` option, built from the registry (``evaluation/utility.py``). The
images are the cell's benign PP images (``split == "coco"``), checked against their sha256; the
reference set is the original model's images of the same prompts and seeds (their recorded
``reference_path``) unless the metric names a ``reference_folder``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from unlearn_exp import config
from unlearn_exp.atomic import atomic_write_text
from unlearn_exp.config import compose, group_choices
from unlearn_exp.errors import UserError
from unlearn_exp.evaluation.utility import make_utility
from unlearn_exp.report.judges import KEY_COLUMNS, recorded_images
from unlearn_exp.report.tables import load_cells


def _metric(name: str, overrides: Sequence[str]):
    if not (config.CONF_DIR / "utility" / f"{name}.yaml").is_file():
        raise UserError(
            f"unknown utility metric '{name}': choose one of {', '.join(group_choices('utility'))}"
        )
    cfg = compose([*overrides, f"utility={name}"]).utility
    return cfg, make_utility(cfg)


def _expected(cell: pd.Series, rows: pd.DataFrame) -> list[str | None]:
    """What each benign prompt allows (the prompt set's ``expected`` column), where it says."""
    from unlearn_exp.cell.inputs import benchmark_rows

    try:
        cfg = OmegaConf.create(json.loads(cell["config_json"]))
        prompts, _ = benchmark_rows(cfg.pp.prompts, cfg.paths.data_dir, "pp.prompts")
    except Exception:  # a config without a loadable benign set: nothing is expected
        return [None] * len(rows)
    by_case = {str(r["case_id"]): r.get("expected") for r in prompts}
    return [by_case.get(str(c)) if isinstance(by_case.get(str(c)), str) else None for c in rows["case_id"]]


def _references(cfg, rows: pd.DataFrame) -> list:
    from PIL import Image

    from unlearn_exp.inversion.image_sets import IMAGE_SUFFIXES

    folder = cfg.get("reference_folder")
    if folder:
        paths = sorted(
            p for p in Path(str(folder)).expanduser().glob("*") if p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not paths:
            raise UserError(f"utility reference_folder {folder} holds no images")
    else:
        paths = [Path(str(p)) for p in rows["reference_path"]]
        absent = [str(p) for p in paths if not p.is_file()]
        if absent:
            raise UserError(f"the original model's image {absent[0]} is missing (re-run the cell)")
    return [Image.open(p).convert("RGB") for p in paths]


def _metrics(names: Sequence[str], overrides: Sequence[str]) -> dict:
    if not names or len(set(names)) != len(names):
        raise UserError(f"--utility needs distinct metric names, got {list(names)}")
    return {name: _metric(name, overrides) for name in names}


def cell_utility(cell: pd.Series, metrics: dict) -> dict[str, float]:
    """Each metric of one recorded cell's benign images (``metrics``: name -> (config, metric))."""
    from PIL import Image

    rows = recorded_images(cell, "coco")
    if rows.empty:
        raise UserError(f"cell {cell['cell_key']} recorded no benign images (pp.prompts)")
    images = [Image.open(p).convert("RGB") for p in rows["image_path"]]
    prompts, expected = list(rows["prompt"]), _expected(cell, rows)
    out, references = {"n": len(images)}, {}
    for name, (cfg, metric) in metrics.items():
        source = cfg.get("reference_folder")  # each reference set read once per cell
        if source not in references:
            references[source] = _references(cfg, rows)
        out[name] = metric.score(images, prompts, references[source], expected)
    return out


def utility_table(
    results: Sequence[str | Path], names: Sequence[str], overrides: Sequence[str] = ()
) -> pd.DataFrame:
    """One row per recorded cell: each metric of its benign images."""
    cells = load_cells(results)
    if cells.empty:
        raise UserError(f"no recorded cells under {', '.join(map(str, results))}")
    metrics = _metrics(names, overrides)
    out = []
    for _, cell in cells.sort_values(KEY_COLUMNS, na_position="last").iterrows():
        row = {"cell_key": cell["cell_key"], **{k: cell.get(k) for k in KEY_COLUMNS}}
        out.append(row | cell_utility(cell, metrics))
    return pd.DataFrame(out)


def add_utility_columns(tables: dict, names: Sequence[str], overrides: Sequence[str] = ()) -> None:
    """The metrics as columns of the main and long tables, for the cells their positions took
    (``make reproduce-table`` with ``--utility-columns``); "-" where a position has no cell."""
    from unlearn_exp.report.tables import Column

    metrics = _metrics(names, overrides)
    done: dict[str, dict[str, float]] = {}
    for table in tables.values():
        if not table.name.startswith(("main_", "long_")) or "cell_key" not in table.data:
            continue
        by_key = {str(r["cell_key"]): r for r in table.used}
        for key in table.data["cell_key"].dropna().astype(str):
            if key in by_key and key not in done:
                done[key] = cell_utility(by_key[key], metrics)
        for name in names:
            table.data[name] = [
                done.get(str(k), {}).get(name, math.nan) if isinstance(k, str) else math.nan
                for k in table.data["cell_key"]
            ]
            table.columns.append(Column(name, name, name.replace("_", r"\_"), "g4"))


def render_utility(table: pd.DataFrame, names: Sequence[str]) -> str:
    head = ["checkpoint", "guidance", "embedding", "n", *names]
    lines = [
        "Utility of each cell's benign images (no resampling): "
        + ", ".join(names)
        + " (FID and KID against the original model's images of the same prompts unless a reference "
        "folder is named; docs/methods.md 7.6).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for _, r in table.iterrows():
        cells = [str(r["checkpoint_label"]), str(r["guidance"]), str(r["embedding"]), str(r["n"])]
        cells += [f"{r[n]:.4g}" for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_utility(table: pd.DataFrame, names: Sequence[str], out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    return [
        atomic_write_text(out / "utility.md", render_utility(table, names)),
        atomic_write_text(out / "utility.csv", table.to_csv(index=False)),
    ]
