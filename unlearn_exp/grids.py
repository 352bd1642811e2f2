"""Image grids: the same prompts and seeds across the methods of one checkpoint, beside the original.

``write_grids(tables, out, ...)`` writes ``grid_<label>_beta<B>.png`` per checkpoint: rows are a
fixed sample of benchmark prompts (the first ``n_bench`` by file order) and a few benign ones, columns
the original model, the unlearned checkpoint, +SLD, +SLD+C*, +SAFREE, +SAFREE+C*. Each tile is
captioned with the judge's verdict (unsafe/safe and its score; benign tiles also say whether the
image shows what the prompt asked for, where the judge can tell). The cells' own images come from
their ``images.parquet``; the original model's are sampled once through the artifact store (the
same prompts and seeds), so they cost nothing the second time.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd

from unlearn_exp import paper
from unlearn_exp.atomic import atomic_file
from unlearn_exp.config import compose
from unlearn_exp.hashing import config_hash
from unlearn_exp.identity import model_identity

log = logging.getLogger("unlearn_exp")

COLUMNS = ("Original", *paper.METHODS)


def _images_of(row: pd.Series) -> pd.DataFrame | None:
    """The per-image rows of a cell (``images.parquet`` beside its ``cells.parquet``)."""
    source = row.get("_source") if hasattr(row, "get") else None
    if not isinstance(source, str):
        return None
    path = Path(source).with_name("images.parquet")
    if not path.is_file():
        return None
    return pd.read_parquet(path)


def pick_rows(images: pd.DataFrame, n_bench: int, n_benign: int) -> pd.DataFrame:
    """The grid's rows: the first benchmark prompts by file order, then the first benign ones."""
    bench = images[images["split"] == "bench"].sort_values(["source_row", "image_index"]).head(n_bench)
    benign = images[images["split"] != "bench"].sort_values(["source_row", "image_index"]).head(n_benign)
    return pd.concat([bench, benign], ignore_index=True)


def caption(img: dict[str, Any]) -> str:
    safe = img.get("safe")
    if img.get("original"):
        return "original model"
    if safe is None or (isinstance(safe, float) and math.isnan(safe)):
        verdict = "not judged"
    else:
        score = img.get("score")
        verdict = ("safe" if bool(safe) else "UNSAFE") + (
            f" {float(score):.2f}" if score is not None and score == score else ""
        )
    ok = img.get("benign_ok")
    if ok is not None and not (isinstance(ok, float) and math.isnan(ok)):
        verdict += ", as asked" if bool(ok) else ", NOT as asked"
    return verdict


def _index(columns: dict[str, pd.DataFrame]) -> dict[str, dict[tuple, dict[str, Any]]]:
    """Each column's image rows by (case_id, split, image_index), the first of each: built once per
    grid, where every tile is looked up."""
    index = {}
    for name, frame in columns.items():
        rows: dict[tuple, dict[str, Any]] = {}
        for rec in frame.to_dict("records"):
            rows.setdefault((rec["case_id"], rec["split"], rec["image_index"]), rec)
        index[name] = rows
    return index


def _hit(index: dict[str, dict[tuple, dict[str, Any]]], key, name: str) -> dict[str, Any] | None:
    """The image row of column ``name`` (``_index``) for the grid row ``key`` whose file is here, or None."""
    hit = index.get(name, {}).get((key.case_id, key.split, key.image_index))
    return dict(hit) if hit is not None and Path(str(hit.get("image_path"))).is_file() else None


def _row_label(key) -> str:
    label = ("[benign] " if key.split != "bench" else "") + str(key.prompt)
    return label[:38] + ("..." if len(label) > 38 else "")


def grid_key(columns: dict[str, pd.DataFrame], keys: pd.DataFrame, title: str) -> str:
    """What a grid shows: its title, row labels, and per tile the image file and its caption (the
    cache's image files are named by content, so the same key draws the same picture)."""
    index = _index(columns)
    tiles = [
        [
            _row_label(k),
            *[(h["image_path"], caption(h)) if h else None for h in (_hit(index, k, n) for n in COLUMNS)],
        ]
        for k in keys.itertuples(index=False)
    ]
    return config_hash({"title": title, "columns": list(COLUMNS), "tiles": tiles, "layout": 1})


def png_key(path: Path) -> str | None:
    """The ``unlearn_exp_key`` a figure was drawn under (PNG metadata), or None."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.info.get("unlearn_exp_key")
    except Exception:
        return None


def render(columns: dict[str, pd.DataFrame], keys: pd.DataFrame, title: str, path: Path) -> Path:
    """Draw the grid: ``columns`` maps a column title to image rows indexed like ``keys``. A grid
    already drawn from the same tiles (its ``grid_key`` in the PNG's metadata) is kept as it is."""
    key = grid_key(columns, keys, title)
    if path.is_file() and png_key(path) == key:
        return path
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    index = _index(columns)
    n_rows, n_cols = len(keys), len(COLUMNS)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.9 * n_cols + 1.6, 2.0 * n_rows + 0.6), squeeze=False)
    for r, row_key in enumerate(keys.itertuples(index=False)):
        for c, name in enumerate(COLUMNS):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            hit = _hit(index, row_key, name)
            if hit is None:
                ax.text(0.5, 0.5, "-", ha="center", va="center", fontsize=14, color="grey")
            else:
                img = Image.open(hit["image_path"]).convert("RGB")
                ax.imshow(img, interpolation="nearest")
                unsafe = (
                    hit.get("safe") is not None and hit.get("safe") == hit.get("safe") and not hit["safe"]
                )
                colour = "tab:red" if unsafe else "black"
                ax.set_xlabel(caption(hit), fontsize=7, color=colour)
            if r == 0:
                ax.set_title(name, fontsize=8)
            if c == 0:
                ax.set_ylabel(_row_label(row_key), fontsize=6.5, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png", metadata={"unlearn_exp_key": key})
    plt.close(fig)
    return path


def _tiles(columns: dict[str, pd.DataFrame], keys: pd.DataFrame) -> list[tuple[str, str]]:
    """(image file, "column | prompt | verdict") of every drawn tile, row by row."""
    index, out = _index(columns), []
    for key in keys.itertuples(index=False):
        for name in COLUMNS:
            hit = _hit(index, key, name)
            if hit is not None:
                out.append((str(hit["image_path"]), f"{name} | {str(key.prompt)[:60]} | {caption(hit)}"))
    return out


def original_images(cfg_overrides: list[str], rows: pd.DataFrame) -> pd.DataFrame:
    """The original model's images for ``rows`` (same prompts and seeds), through the artifact store."""
    from unlearn_exp.cell import ORIGINAL, cell_store, chunk_meta, generate_samples, load_model

    cfg = compose(cfg_overrides)
    store = cell_store(cfg)
    wanted = [
        {"case_id": r.case_id, "prompt": r.prompt, "seed": int(r.seed), "image_index": int(r.image_index)}
        for r in rows.itertuples(index=False)
    ]
    identity = {"model": model_identity(cfg.model), **ORIGINAL}

    def load():  # only when an image is not in the cache yet: a rerun imports no diffusers
        from unlearn_exp.sampling import apply_gpu_options

        comps = load_model(cfg.model)
        apply_gpu_options(comps, cfg.sampling)  # as the cell that sampled the other columns
        return comps

    out = []
    for chunk in generate_samples(load, None, wanted, identity, store, cfg):
        for want, meta in zip(chunk.rows, chunk_meta(chunk)):
            out.append(
                {**want, "image_path": str(chunk.folder / meta["file"]), "safe": None, "original": True}
            )
    frame = pd.DataFrame(out)
    frame["split"] = list(rows["split"])
    return frame


def write_grids(
    long_tables: dict[str, Any],
    experiments: dict[str, str],
    out: str | Path,
    extra: list[str] | tuple[str, ...] = (),
    n_bench: int = 6,
    n_benign: int = 3,
    tiles: list[dict[str, Any]] | None = None,
) -> list[Path]:
    """One grid per (task label, beta) of every long table whose cells have rows on disk; with
    ``tiles``, each grid's tiles (image file, "column | prompt | verdict") are appended to it."""
    written = []
    for label, table in long_tables.items():
        by_key = {str(r["cell_key"]): r for r in table.used}
        for beta, part in table.data.groupby("beta", sort=True):
            columns: dict[str, pd.DataFrame] = {}
            for rec in part.itertuples(index=False):
                row = by_key.get(str(rec.cell_key)) if isinstance(rec.cell_key, str) else None
                images = _images_of(row) if row is not None else None
                if images is not None:
                    columns[rec.method] = images
            if not columns:
                continue
            keys = pick_rows(next(iter(columns.values())), n_bench, n_benign)
            if "seed" not in keys.columns:
                continue
            try:
                overrides = [f"+experiment={experiments[label]}", f"checkpoint.beta={int(beta)}", *extra]
                columns["Original"] = original_images(overrides, keys)
            except Exception as exc:  # no weights here: the grid is drawn without that column
                log.warning(
                    "grid %s beta=%s: no original-model column (%s)", label, beta, str(exc).splitlines()[0]
                )
            title = f"{label}, DUO beta={int(beta)}: the same prompts and seeds across the methods"
            written.append(render(columns, keys, title, Path(out) / f"grid_{label}_beta{int(beta)}.png"))
            if tiles is not None:
                tiles.append(
                    {
                        "name": f"{label}_beta{int(beta)}",
                        "png": str(written[-1]),
                        "title": title,
                        "tiles": _tiles(columns, keys),
                    }
                )
    return written
