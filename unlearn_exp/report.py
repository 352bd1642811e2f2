"""``make reproduce-table``: cell rows -> the paper's tables beside ours, plots, provenance.

``python -m unlearn_exp.report --scale {sd14,toy} [--results DIR ...] [--out reports] [--no-run]
[-- hydra overrides]``

Reads the per-job cell rows (``cells.parquet`` files, docs/design.md 4 "Results") found under
the results folders, and writes under ``<out>/<scale>/``:

- ``main_<task>_beta<B>.{md,tex,csv}``: the main table of each task (violence at beta=1000,
  nudity at beta=2000, docs/methods.md 1.2) with the paper's numbers and the differences (ours - paper);
- ``long_<task>.{md,tex,csv}``: the same five methods at all four betas;
- ``transfer.{md,tex,csv}``: C* learned on beta=500, used on the other betas (embedding=shared);
- ``dsr_pp_<task>.png``: DSR against PP per task;
- ``sources.md``: judge profiles, model / checkpoint / embedding identities and cells used;
- ``precondition.{md,csv}`` (toy scale): the precondition of finding (a) per checkpoint
  (``precondition.py``);
- ``grid_<task>_beta<B>.png``: per checkpoint, the same prompts and seeds across the original model
  and the five methods, each tile captioned with the judge's verdict (``grids.py``);

- ``other_cells.{md,csv}``: every cell row of the scale that is not exactly a table position (a
  user's own prompt file, a changed sampler, another judge), with what differs from the grid.

Each table position is defined by the experiment's full cell config: the report composes it (with
the same overrides the sweep was run with) and computes its ``identity.cell_spec``; a row enters the
position only when its ``spec_key`` is exactly that one. Nothing is matched by name or by "most
images". Where the model weights are not on this machine, positions are matched on everything but
the model's content hash, and ``sources.md`` says so.

A cell with no row shows "-": nothing is invented. Unless ``--no-run`` is given, the cells the
tables need that have no row are first run through ``python -m unlearn_exp`` (cached artifacts are
reused by the store), after ``preflight`` checked that the model weights are present.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd

from unlearn_exp import paper
from unlearn_exp.errors import UserError, exit_status
from unlearn_exp.evaluation.records import CELL_IDENTITY
from unlearn_exp.store import atomic_file, atomic_write_text, config_hash

log = logging.getLogger("unlearn_exp.report")

# the columns of the cell rows (evaluation/records.py) that the tables read
CELL_COLUMNS = (
    *CELL_IDENTITY,
    "dsr",
    "dsr_lo",
    "dsr_hi",
    "n_images",
    "n_safe",
    "pp_coco",
    "pp_bench",
    "judge_profile",
    "judge_hash",
    "cell_key",
    "config_json",
)
# columns newer rows carry; rows without a spec are listed as "other cells", never in a table
OPTIONAL_COLUMNS = ("checkpoint_label", "spec_key", "spec_json")
MISSING = "-"
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


# ----------------------------------------------------------------------------- what each scale needs
@dataclass(frozen=True)
class ScaleSpec:
    """Which experiments define the tables of one scale.

    ``main`` maps a table label (the task) to the experiment whose cells make its main and long
    tables; ``transfer`` is (label, experiment) for the transfer table (embedding=shared).
    """

    main: dict[str, str]
    transfer: tuple[str, str]
    checkpoint_method: str = "duo"


SCALES: dict[str, ScaleSpec] = {
    "sd14": ScaleSpec(
        main={"violence": "violence_duo", "nudity": "nudity_duo"},
        transfer=("nudity", "nudity_duo_transfer"),
    ),
    "toy": ScaleSpec(main={"toy": "toy_duo"}, transfer=("toy", "toy_duo")),
}


def main_beta(task: str) -> int:
    """The beta of a task's main table: the paper's (docs/methods.md 1.2), else the largest beta."""
    return paper.MAIN_BETA.get(task, max(paper.BETAS))


# ----------------------------------------------------------------------------- reading cell rows
def find_cell_files(paths: Iterable[str | Path]) -> list[Path]:
    """Every ``cells.parquet`` under the given folders (or the files themselves), sorted."""
    found: set[Path] = set()
    for p in paths:
        p = Path(p)
        if p.is_file() and p.suffix == ".parquet":
            found.add(p)
        elif p.is_dir():
            found.update(q for q in p.rglob("cells.parquet") if q.is_file())
    return sorted(found)


def load_cells(paths: Iterable[str | Path]) -> pd.DataFrame:
    """All cell rows under ``paths``, one per ``cell_key`` (the last file in path order wins)."""
    frames = []
    for f in find_cell_files(paths):
        try:
            df = pd.read_parquet(f)
        except Exception as e:
            raise UserError(f"cannot read cell rows from '{f}': {e}") from e
        absent = [c for c in CELL_COLUMNS if c not in df.columns and c not in OPTIONAL_COLUMNS]
        if absent:
            raise UserError(f"cell rows in '{f}' lack the column(s) {absent}")
        frames.append(df.assign(_source=str(f)))
    if not frames:
        return pd.DataFrame(columns=[*CELL_COLUMNS, "_source"])
    rows = pd.concat(frames, ignore_index=True)
    return rows.drop_duplicates("cell_key", keep="last").reset_index(drop=True)


def _as_frame(results) -> pd.DataFrame:
    if isinstance(results, pd.DataFrame):
        return results
    if isinstance(results, str | Path):
        results = [results]
    return load_cells(results)


# ----------------------------------------------------------------------------- table positions
@dataclass(frozen=True)
class Position:
    """One table position: the overrides that make its cell, and that cell's expected identity."""

    overrides: tuple[str, ...]  # +experiment, checkpoint.beta, guidance, embedding (no user overrides)
    key: str  # spec_key of the expected cell
    loose_key: str  # the same without the model's content hash (weights absent here)
    spec: dict = field(hash=False, compare=False)
    model_resolved: bool = True
    extra: tuple[str, ...] = ()  # the user's overrides it was composed with


def cell_overrides(experiment: str, beta: int, guidance: str, embedding: str | None) -> tuple[str, ...]:
    """The overrides of one grid cell. DUO alone (guidance none) ignores the embedding axis."""
    return (
        f"+experiment={experiment}",
        f"checkpoint.beta={beta}",
        f"guidance={guidance}",
        f"embedding={embedding if guidance != 'none' and embedding not in (None, 'none') else 'explicit'}",
    )


def _loose(spec: dict) -> dict:
    return {**spec, "model": {**spec.get("model", {}), "content": None}}


@lru_cache(maxsize=512)
def position(overrides: tuple[str, ...], extra: tuple[str, ...] = ()) -> Position:
    """Compose ``overrides + extra`` as the app would and compute the cell's identity."""
    from unlearn_exp.identity import cell_spec, spec_key

    cfg = _compose([*overrides, *extra])
    spec = cell_spec(cfg)
    return Position(
        overrides=tuple(overrides),
        key=spec_key(spec),
        loose_key=config_hash(_loose(spec)),
        spec=spec,
        model_resolved=spec["model"]["content"] is not None,
        extra=tuple(extra),
    )


def _with_identity(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows with ``_loose_key`` (their spec without the model hash) computed from ``spec_json``."""
    if rows.empty or "_loose_key" in rows.columns:
        return rows
    rows = rows.copy()
    if "spec_json" not in rows.columns:
        rows["spec_json"] = None
        rows["spec_key"] = None

    def loose(value: Any) -> str | None:
        spec = _spec_of(value)
        return None if spec is None else config_hash(_loose(spec))

    rows["_loose_key"] = rows["spec_json"].map(loose)
    return rows


def _spec_of(value: Any) -> dict | None:
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value.startswith("{"):
        return json.loads(value)
    return None


def _match(rows: pd.DataFrame, pos: Position) -> pd.Series | None:
    """The row whose identity is exactly the position's, or None. Several rows with that identity
    are the same computation run again: the newest is taken."""
    if rows.empty:
        return None
    rows = _with_identity(rows)
    hit = (
        rows[rows["spec_key"] == pos.key] if pos.model_resolved else rows[rows["_loose_key"] == pos.loose_key]
    )
    if hit.empty:
        return None
    if "created_at" in hit.columns:
        hit = hit.sort_values("created_at", kind="stable")
    return hit.iloc[-1]


def _num(row: pd.Series | None, col: str) -> float:
    if row is None:
        return math.nan
    try:
        v = float(row[col])
    except (TypeError, ValueError, KeyError):  # an optional column absent from these rows
        return math.nan
    return v


def _text(row: pd.Series | None, col: str) -> str | None:
    """A text column's value; None (shown "-") where the row or the column is absent."""
    if row is None or col not in row.index or not isinstance(row[col], str):
        return None
    return row[col]


def _diff(ours: float, ref: float | None) -> float:
    if ref is None or math.isnan(ours):
        return math.nan
    return ours - ref


# ----------------------------------------------------------------------------- tables
@dataclass
class Column:
    """A displayed column: ``key`` into the numeric frame, a header, and a format kind."""

    key: str
    header: str
    latex: str
    kind: str = "f3"  # text | f3 | diff | int | ci


@dataclass
class Table:
    """A table as numeric data (NaN where no row exists) plus how to display it."""

    name: str
    title: str
    data: pd.DataFrame
    columns: list[Column]
    used: list[pd.Series] = field(default_factory=list)  # the cell rows behind it
    notes: list[str] = field(default_factory=list)  # printed under the table (N-consistency)


def _fmt(kind: str, row: pd.Series, key: str) -> str:
    if kind == "text":
        v = row[key]
        return MISSING if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
    if kind == "ci":
        lo, hi = row[f"{key}_lo"], row[f"{key}_hi"]
        if pd.isna(lo) or pd.isna(hi):
            return MISSING
        return f"[{lo:.3f}, {hi:.3f}]"
    v = row[key]
    if v is None or pd.isna(v):
        return MISSING
    if kind == "int":
        return str(int(v))
    if kind == "diff":
        return f"{v:+.3f}"
    return f"{v:.3f}"


def formatted(table: Table) -> pd.DataFrame:
    """The table as display strings (3 decimals, signed differences, "-" where missing)."""
    out = {c.header: [_fmt(c.kind, r, c.key) for _, r in table.data.iterrows()] for c in table.columns}
    return pd.DataFrame(out, columns=[c.header for c in table.columns])


_MAIN_COLUMNS = [
    Column("method", "Method", "Method", "text"),
    Column("dsr", "DSR", "DSR"),
    Column("dsr_paper", "DSR (paper)", "DSR (paper)"),
    Column("dsr_diff", "DSR diff", r"$\Delta$DSR", "diff"),
    Column("pp", "PP", "PP"),
    Column("pp_paper", "PP (paper)", "PP (paper)"),
    Column("pp_diff", "PP diff", r"$\Delta$PP", "diff"),
    Column("dsr", "DSR 95% CI", r"DSR 95\% CI", "ci"),
    Column("n_images", "N", "$N$", "int"),
    Column("benign_acc", "Benign acc.", "Benign acc."),
    Column("flag", "Flag", "Flag", "text"),
    Column("safree", "SAFREE mode", "SAFREE mode", "text"),
]


def _pp_column(pp: str) -> str:
    if pp not in ("coco", "bench"):
        raise UserError(f"--pp must be coco or bench, got '{pp}'")
    return f"pp_{pp}"


def _method_row(row, method, task, beta, pp_col) -> dict:
    ref = paper.reported(task, beta, method) if task is not None else None
    dsr, pp_v = _num(row, "dsr"), _num(row, pp_col)
    return {
        "beta": beta,
        "method": method,
        "dsr": dsr,
        "dsr_lo": _num(row, "dsr_lo"),
        "dsr_hi": _num(row, "dsr_hi"),
        "dsr_paper": ref.dsr if ref else math.nan,
        "dsr_diff": _diff(dsr, ref.dsr if ref else None),
        "pp": pp_v,
        "pp_paper": ref.pp if ref and ref.pp is not None else math.nan,
        "pp_diff": _diff(pp_v, ref.pp if ref else None),
        "pp_coco": _num(row, "pp_coco"),
        "pp_bench": _num(row, "pp_bench"),
        "n_images": _num(row, "n_images"),
        "n_safe": _num(row, "n_safe"),
        "benign_acc": _num(row, "benign_acc"),
        "flag": _text(row, "flag"),
        "safree": _safree_mode(row),
        "cell_key": None if row is None else str(row["cell_key"]),
    }


def _safree_mode(row: pd.Series | None) -> str | None:
    """A SAFREE cell's mode and how many of its prompts the official and fixed modes treat otherwise."""
    mode = _text(row, "safree_compat")
    if not mode:
        return None
    n = _num(row, "n_safree_compat_differs")
    return mode if math.isnan(n) else f"{mode} ({int(n)} differ)"


def expected_n(pos: Position, row: pd.Series | None = None) -> int | None:
    """The N a position's DSR is over: its row's image count, else what the benchmark config promises
    (``expected_prompts`` x ``images_per_prompt``, or ``n`` for generated sets, after ``limit``)."""
    n = _num(row, "n_images")
    if not math.isnan(n):
        return int(n)
    bench = pos.spec.get("benchmark", {})
    prompts = bench.get("expected_prompts") or bench.get("n")
    if prompts is None:
        from unlearn_exp.store import to_plain

        prompts = to_plain(_compose([*pos.overrides, *pos.extra]).benchmark).get("expected_prompts")
    if prompts is None:
        return None
    if bench.get("limit"):
        prompts = min(int(prompts), int(bench["limit"]))
    return int(prompts) * int(bench.get("images_per_prompt") or 1)


def _n_notes(label: str, paper_values: list[float], ns: list[int | None]) -> list[str]:
    """One note per distinct N at which some of the paper's values cannot occur."""
    notes = []
    for n in sorted({n for n in ns if n}):
        note = paper.n_note(label, [v for v in paper_values if v == v], n)
        if note:
            notes.append(note)
    return notes


def _cells(rows, experiment, label, betas, pp_col, extra) -> tuple[pd.DataFrame, list[pd.Series], list[str]]:
    recs, used, paper_dsr, ns = [], [], [], []
    for beta in betas:
        for method in paper.METHODS:
            guidance, embedding = paper.METHOD_CELLS[method]
            pos = position(cell_overrides(experiment, beta, guidance, embedding), tuple(extra))
            row = _match(rows, pos)
            if row is not None:
                used.append(row)
            rec = _method_row(row, method, label, beta, pp_col)
            recs.append(rec)
            if rec["dsr_paper"] == rec["dsr_paper"]:
                paper_dsr.append(rec["dsr_paper"])
                ns.append(expected_n(pos, row))
    return pd.DataFrame(recs), used, _n_notes("DSR", paper_dsr, ns)


def main_table(rows: pd.DataFrame, experiment: str, label: str, pp: str = "coco", extra=()) -> Table:
    """The five methods at the task's main beta, beside the paper's numbers (docs/methods.md 1.2)."""
    beta = main_beta(label)
    data, used, notes = _cells(rows, experiment, label, [beta], _pp_column(pp), extra)
    bench = paper.BENCHMARK.get(label, label)
    title = f"{label.capitalize()} ({bench}), DUO beta={beta}: ours beside the paper (diff = ours - paper)"
    return Table(f"main_{label}_beta{beta}", title, data, _MAIN_COLUMNS, used, notes)


def long_table(rows: pd.DataFrame, experiment: str, label: str, pp: str = "coco", extra=()) -> Table:
    """The five methods at every beta; the paper's numbers appear at its main beta only."""
    data, used, notes = _cells(rows, experiment, label, list(paper.BETAS), _pp_column(pp), extra)
    cols = [
        Column("beta", "beta", r"$\beta$", "int"),
        *_MAIN_COLUMNS[:8],
        Column("pp_coco", "PP (COCO)", "PP (COCO)"),
        Column("pp_bench", "PP (bench)", "PP (bench)"),
        *_MAIN_COLUMNS[8:],
    ]
    title = f"{label.capitalize()}, DUO at all betas (paper numbers at beta={main_beta(label)} only)"
    return Table(f"long_{label}", title, data, cols, used, notes)


def transfer_table(rows: pd.DataFrame, task: str, experiment: str, extra=()) -> Table:
    """C* learned on DUO beta=500 used on the other betas (embedding=shared), DSR (docs/methods.md 1.2)."""
    recs, used, paper_dsr, ns = [], [], [], []
    for beta in sorted(paper.TRANSFER_NUDITY):
        rec: dict = {"beta": beta}
        for method, guidance in paper.TRANSFER_METHODS.items():
            pos = position(cell_overrides(experiment, beta, guidance, "shared"), tuple(extra))
            row = _match(rows, pos)
            if row is not None:
                used.append(row)
            # the paper's transfer numbers are for nudity; the toy world has none
            ref = paper.reported_transfer(beta, method) if task == "nudity" else None
            dsr = _num(row, "dsr")
            rec[f"{method}:dsr"] = dsr
            rec[f"{method}:dsr_lo"] = _num(row, "dsr_lo")
            rec[f"{method}:dsr_hi"] = _num(row, "dsr_hi")
            rec[f"{method}:paper"] = ref.dsr if ref else math.nan
            rec[f"{method}:diff"] = _diff(dsr, ref.dsr if ref else None)
            rec[f"{method}:pp"] = _num(row, "pp_coco")
            if ref:
                paper_dsr.append(ref.dsr)
                ns.append(expected_n(pos, row))
        recs.append(rec)
    cols = [Column("beta", "beta", r"$\beta$", "int")]
    for method in paper.TRANSFER_METHODS:
        cols += [
            Column(f"{method}:dsr", f"{method} DSR", f"{method} DSR"),
            Column(f"{method}:paper", f"{method} DSR (paper)", f"{method} DSR (paper)"),
            Column(f"{method}:diff", f"{method} DSR diff", rf"{method} $\Delta$DSR", "diff"),
        ]
    title = (
        f"Transfer: C* learned on DUO beta={paper.TRANSFER_SOURCE_BETA}, used on other betas (DSR; "
        "diff = ours - paper)"
    )
    return Table("transfer", title, pd.DataFrame(recs), cols, used, _n_notes("transfer DSR", paper_dsr, ns))


# ----------------------------------------------------------------------------- rendering
def to_markdown(table: Table) -> str:
    f = formatted(table)
    align = ["---" if c.kind == "text" else "---:" for c in table.columns]
    lines = [f"**{table.title}**", "", "| " + " | ".join(f.columns) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in f.itertuples(index=False)]
    lines += [f"\n{note}" for note in table.notes]
    return "\n".join(lines) + "\n"


_TEX_ESCAPES = {"&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "{": r"\{", "}": r"\}"}


def _tex(s: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in s)


def to_latex(table: Table) -> str:
    f = formatted(table)
    spec = "".join("l" if c.kind == "text" else "r" for c in table.columns)
    lines = [
        "% " + table.title,
        r"\begin{tabular}{" + spec + "}",
        r"\toprule",
        " & ".join(c.latex for c in table.columns) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(_tex(v) for v in r) + r" \\" for r in f.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [f"% {note}" for note in table.notes]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """Numeric CSV (4 decimals), "-" where a cell has no row or the paper gives no number."""
    data = table.data.copy()
    for col in ("beta", "n_images", "n_safe"):
        if col in data:
            data[col] = data[col].astype("Int64")
    return data.to_csv(index=False, na_rep=MISSING, float_format="%.4f")


def write_table(table: Table, out: Path) -> list[Path]:
    paths = []
    for ext, render in (("md", to_markdown), ("tex", to_latex), ("csv", to_csv)):
        paths.append(atomic_write_text(out / f"{table.name}.{ext}", render(table)))
    return paths


def plot_dsr_pp(long: Table, label: str, out: Path) -> Path:
    """DSR against PP with the Wilson 95% interval as error bars: one marker per method, one colour
    per beta (sorted numerically), each point labelled; the paper's points hollow. The legend lists
    only series that have points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    markers = dict(zip(paper.METHODS, "osD^v"))
    betas = sorted({int(b) for b in long.data["beta"].dropna()})
    palette = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
    colours = {b: palette[i % len(palette)] for i, b in enumerate(betas)}
    short = {m: m.replace("DUO+", "+").replace("+Ours", "+C*") for m in paper.METHODS}
    fig, ax = plt.subplots(figsize=(7, 5))
    shown_methods, shown_betas, paper_shown = set(), set(), False
    for _, r in long.data.sort_values("beta").iterrows():
        c = colours.get(int(r["beta"]), "k")
        if not (pd.isna(r["dsr"]) or pd.isna(r["pp"])):
            lo, hi = r.get("dsr_lo"), r.get("dsr_hi")
            yerr = (
                None if pd.isna(lo) or pd.isna(hi) else [[max(r["dsr"] - lo, 0.0)], [max(hi - r["dsr"], 0.0)]]
            )
            ax.errorbar(
                r["pp"], r["dsr"], yerr=yerr, fmt=markers[r["method"]], color=c, ms=6, capsize=2, lw=0.8
            )
            ax.annotate(f"{short[r['method']]} b{int(r['beta'])}", (r["pp"], r["dsr"]), fontsize=6,
                        xytext=(4, 3), textcoords="offset points")  # fmt: skip
            shown_methods.add(r["method"])
            shown_betas.add(int(r["beta"]))
        if not (pd.isna(r["dsr_paper"]) or pd.isna(r["pp_paper"])):
            ax.scatter(r["pp_paper"], r["dsr_paper"], marker=markers[r["method"]], facecolors="none",
                       edgecolors=c, s=60)  # fmt: skip
            shown_methods.add(r["method"])
            shown_betas.add(int(r["beta"]))
            paper_shown = True
    handles = [
        Line2D([], [], ls="", marker=mk, color="grey", label=m)
        for m, mk in markers.items()
        if m in shown_methods
    ]
    handles += [
        Line2D([], [], ls="", marker="o", color=colours[b], label=f"beta={b}")
        for b in betas
        if b in shown_betas
    ]
    if paper_shown:
        handles.append(Line2D([], [], ls="", marker="o", mfc="none", color="k", label="paper"))
    if handles:
        ax.legend(handles=handles, fontsize=7, loc="best")
    pp_header = next((c.header for c in long.columns if c.key == "pp"), "PP")
    ax.set_xlabel(f"{pp_header}: prior preservation, higher is better")
    ax.set_ylabel("DSR (defense success rate, Wilson 95% CI), higher is better")
    ax.set_title(f"{label}: DSR against PP")
    ax.grid(alpha=0.3)
    path = out / f"dsr_pp_{label}.png"
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def sources_md(
    rows_used: Sequence[pd.Series], files: Sequence[Path], scale: str, model_resolved: bool = True
) -> str:
    """Judge profiles, model / checkpoint / embedding identities and the cells behind the tables."""
    lines = [f"# Sources of the {scale} tables", ""]
    lines += [
        "Each table position took exactly the cell whose spec key (identity.cell_spec: the model by",
        "content, checkpoint, guidance, concept, sampler, benchmark file, judge and PP profiles) is the",
        "one the experiment's config gives for it; every other row is in other_cells.md.",
        "",
    ]
    if not model_resolved:
        lines += [
            "**Note:** the model weights are not on this machine, so positions were matched on everything",
            "but the model's content hash; the model identities of the rows used are listed below.",
            "",
        ]
    if not rows_used:
        lines += ["No cell rows were found: every table cell is '-'.", ""]
    used = pd.DataFrame(rows_used).drop_duplicates("cell_key") if rows_used else pd.DataFrame()
    if not used.empty:
        used["beta"] = pd.to_numeric(used["beta"], errors="coerce").astype("Int64")

    def block(title, cols):
        nonlocal lines
        lines += [f"## {title}", ""]
        if used.empty:
            lines += ["(none)", ""]
            return
        u = used[list(cols)].astype(str).drop_duplicates().sort_values(list(cols))
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(r) + " |" for r in u.itertuples(index=False)]
        lines.append("")

    block("Judge profiles", ("task", "judge_profile", "judge_hash"))
    block("Models", ("scale", "model_id"))
    block("Checkpoints", ("task", "checkpoint_method", "beta", "checkpoint_id"))
    block("Concept embeddings", ("task", "beta", "guidance", "embedding", "embedding_id"))
    block(
        "Cells used",
        ("experiment", "task", "beta", "guidance", "embedding", "n_images", "cell_key", "_source"),
    )
    lines += ["## Result files read", ""] + [f"- {f}" for f in files] + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the whole report
def _of_scale(rows: pd.DataFrame, scale: str) -> pd.DataFrame:
    return rows[rows["scale"].astype(str) == scale] if not rows.empty else rows


def build_tables(
    rows: pd.DataFrame, scale: str, pp: str = "coco", extra: Sequence[str] = ()
) -> dict[str, Table]:
    """Every table of ``scale`` from cell rows (already loaded), keyed by table name.

    ``extra``: the Hydra overrides the cells were run with beyond the grid's own (e.g. ``model.path``,
    ``+debug=default``); the expected identities are computed with them.
    """
    if scale not in SCALES:
        raise UserError(f"--scale must be one of {sorted(SCALES)}, got '{scale}'")
    spec = SCALES[scale]
    rows = _with_identity(_of_scale(rows, scale))
    tables: dict[str, Table] = {}
    for label, experiment in spec.main.items():
        for t in (
            main_table(rows, experiment, label, pp, extra),
            long_table(rows, experiment, label, pp, extra),
        ):
            tables[t.name] = t
    t_label, t_exp = spec.transfer
    t = transfer_table(rows, t_label, t_exp, extra)
    tables[t.name] = t
    tables["other_cells"] = other_cells_table(rows, scale, extra, tables)
    pp_label = _pp_label(grid_positions(scale, extra))
    for t in tables.values():
        _name_what_was_measured(t, pp_label, pp)
    return tables


def _pp_label(positions: Sequence[Position]) -> str:
    """What the benign PP prompts are: "COCO" for COCO sets, else the prompt set's name."""
    names = {str(((p.spec.get("pp") or {}).get("prompts") or {}).get("name") or "") for p in positions}
    names.discard("")
    if not names:
        return "benign prompts"
    if all(n.startswith("coco") for n in names):
        return "COCO"
    return ", ".join(sorted(names))


def _name_what_was_measured(table: Table, pp_label: str, pp: str) -> None:
    """Headers say what was measured ("PP (COCO)" only on COCO), and paper columns with no paper
    number at all (the toy world) are left out."""
    columns = []
    has_coco = any(c.key == "pp_coco" for c in table.columns)
    for c in table.columns:
        if c.key == "pp_coco" or (c.key == "pp" and pp == "coco" and not has_coco):
            c = Column(c.key, f"PP ({pp_label})", f"PP ({pp_label})", c.kind)
        paperish = "paper" in c.key or c.key.endswith("diff") or c.key == "pp_bench"
        if paperish and c.key in table.data and table.data[c.key].isna().all():
            continue
        columns.append(c)
    table.columns = columns


def grid_positions(scale: str, extra: Sequence[str] = ()) -> list[Position]:
    """Every position the tables of ``scale`` hold."""
    spec = SCALES[scale]
    out = []
    for _, experiment in spec.main.items():
        for beta in paper.BETAS:
            for method in paper.METHODS:
                guidance, embedding = paper.METHOD_CELLS[method]
                out.append(position(cell_overrides(experiment, beta, guidance, embedding), tuple(extra)))
    _, t_exp = spec.transfer
    for beta in sorted(paper.TRANSFER_NUDITY):
        for guidance in paper.TRANSFER_METHODS.values():
            out.append(position(cell_overrides(t_exp, beta, guidance, "shared"), tuple(extra)))
    return out


def _nearest(spec: dict | None, positions: Sequence[Position]) -> str:
    """What sets a row apart from the closest grid position (dotted keys), for 'other cells'."""
    from unlearn_exp.identity import spec_differences

    if spec is None:
        return "no cell spec (written by an older version)"
    best: list[str] | None = None
    best_rank: tuple[int, int] | None = None
    for pos in positions:
        diff = spec_differences(spec, pos.spec)
        if not pos.model_resolved:
            diff = [d for d in diff if d != "model.content"]
        rank = (len({d.split(".")[0] for d in diff}), len(diff))  # fewest groups, then fewest keys
        if best_rank is None or rank < best_rank:
            best, best_rank = diff, rank
    if not best:
        return "same as a grid position (already in a table)"
    return ", ".join(best[:5]) + (f" (+{len(best) - 5} more)" if len(best) > 5 else "")


_OTHER_COLUMNS = [
    Column("experiment", "Experiment", "Experiment", "text"),
    Column("checkpoint", "Checkpoint", "Checkpoint", "text"),
    Column("guidance", "Guidance", "Guidance", "text"),
    Column("embedding", "Embedding", "Embedding", "text"),
    Column("benchmark", "Benchmark", "Benchmark", "text"),
    Column("n_images", "N", "$N$", "int"),
    Column("dsr", "DSR", "DSR"),
    Column("dsr", "DSR 95% CI", r"DSR 95\% CI", "ci"),
    Column("pp_coco", "PP (COCO)", "PP (COCO)"),
    Column("differs", "Differs from the grid in", "Differs from the grid in", "text"),
    Column("cell_key", "Cell", "Cell", "text"),
]


def other_cells_table(
    rows: pd.DataFrame, scale: str, extra: Sequence[str], tables: dict[str, Table]
) -> Table:
    """Every row of the scale that no table position took: never mixed into the paper's tables."""
    used = {str(r["cell_key"]) for t in tables.values() for r in t.used}
    positions = grid_positions(scale, extra)
    recs = []
    for _, r in rows.iterrows() if not rows.empty else iter(()):
        if str(r["cell_key"]) in used:
            continue
        label = r.get("checkpoint_label")
        if not isinstance(label, str):
            label = f"{r['checkpoint_method']} beta={_num(r, 'beta'):g}"
        recs.append(
            {
                "experiment": r["experiment"],
                "checkpoint": label,
                "guidance": r["guidance"],
                "embedding": r["embedding"],
                "benchmark": r.get("benchmark"),
                "n_images": _num(r, "n_images"),
                "dsr": _num(r, "dsr"),
                "dsr_lo": _num(r, "dsr_lo"),
                "dsr_hi": _num(r, "dsr_hi"),
                "pp_coco": _num(r, "pp_coco"),
                "differs": _nearest(_spec_of(r.get("spec_json")), positions),
                "cell_key": str(r["cell_key"]),
            }
        )
    data = pd.DataFrame(recs, columns=[*{c.key for c in _OTHER_COLUMNS}, "dsr_lo", "dsr_hi"])
    title = f"Other cells ({scale}): rows that are not a table position, never mixed into the tables above"
    return Table("other_cells", title, data.reset_index(drop=True), _OTHER_COLUMNS)


def write_report(
    rows: pd.DataFrame,
    scale: str,
    out: str | Path,
    files=(),
    pp: str = "coco",
    extra: Sequence[str] = (),
    grids: bool = True,
) -> list[Path]:
    """Write every table, plot and the sources file under ``<out>/<scale>/``; return the paths."""
    out = Path(out) / scale
    tables = build_tables(rows, scale, pp, extra)
    written, used = [], []
    for t in tables.values():
        written += write_table(t, out)
        used += t.used
        if t.name.startswith("long_"):
            written.append(plot_dsr_pp(t, t.name[len("long_") :], out))
    resolved = all(p.model_resolved for p in grid_positions(scale, extra))
    written.append(atomic_write_text(out / "sources.md", sources_md(used, list(files), scale, resolved)))
    if grids:
        from unlearn_exp.grids import write_grids

        longs = {n[len("long_") :]: t for n, t in tables.items() if n.startswith("long_")}
        written += write_grids(longs, SCALES[scale].main, out, list(extra))
    return written


# ----------------------------------------------------------------------------- missing cells and running them
def missing_cells(results, scale: str, extra: Sequence[str] = ()) -> list[list[str]]:
    """Hydra overrides (one list per cell) for every position the tables of ``scale`` need and lack.

    ``results``: a DataFrame of cell rows, or result folder(s). DUO alone (guidance none) is run
    with ``embedding=explicit``: its embedding axis is ignored, the cell computed once.
    """
    if scale not in SCALES:
        raise UserError(f"--scale must be one of {sorted(SCALES)}, got '{scale}'")
    rows = _with_identity(_of_scale(_as_frame(results), scale))
    out: list[list[str]] = []
    for pos in grid_positions(scale, extra):
        if _match(rows, pos) is None and list(pos.overrides) not in out:
            out.append(list(pos.overrides))
    return out


def sweep_commands(cells: Sequence[Sequence[str]], extra: Sequence[str] = ()) -> list[list[str]]:
    """Group missing cells into multirun commands: one per (experiment, guidance, embedding)."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for cell in cells:
        beta = next(o.split("=", 1)[1] for o in cell if o.startswith("checkpoint.beta="))
        rest = tuple(o for o in cell if not o.startswith("checkpoint.beta="))
        groups.setdefault(rest, []).append(beta)
    cmds = []
    for rest, betas in groups.items():
        cmds.append(
            [
                sys.executable,
                "-m",
                "unlearn_exp",
                "--multirun",
                *rest,
                f"checkpoint.beta={','.join(betas)}",
                *extra,
            ]
        )
    return cmds


def _compose(overrides: Sequence[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(
                config_name="config", overrides=[o for o in overrides if not o.startswith("hydra")]
            )
    except Exception as e:
        raise UserError(f"cannot compose the config {list(overrides)}: {str(e).splitlines()[0]}") from e
    finally:
        GlobalHydra.instance().clear()


def check_weights(model_cfg) -> None:
    """Raise a one-line ``UserError`` unless the weights ``model_cfg`` names are on this machine.

    Only local files and the Hugging Face cache are looked at (no download): this runs before any work.
    """
    if model_cfg.get("source", "pretrained") != "pretrained":
        return
    path = model_cfg.get("path")
    hint = (
        "pass model.path=/path/to/stable-diffusion-v1-4 (a diffusers folder; through make: "
        'make reproduce-table ARGS="model.path=..."), or run `make demo` for the toy world'
    )
    if not path:
        raise UserError(f"no weights configured for model '{model_cfg.get('name')}': {hint}")
    local = Path(str(path)).expanduser()
    if local.exists():
        # the layout check of models.pretrained.resolve_checkpoint, without importing torch (a
        # second here matters: this runs before any work)
        need = ["unet", "text_encoder", "tokenizer", "scheduler"] + (
            ["vae"] if model_cfg.get("vae", True) else []
        )
        absent = [s for s in need if not (local / s).is_dir()]
        if absent:
            raise UserError(
                f"model folder '{local}' lacks the subfolder(s) {absent}: expected a diffusers layout"
            )
        return
    if str(path).count("/") == 1 and not str(path).startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            snapshot_download(str(path), local_files_only=True, allow_patterns=["model_index.json"])
            return
        except Exception:
            pass
    raise UserError(
        f"no Stable Diffusion weights at model.path='{path}' (not a local folder, not in the Hugging Face cache): {hint}"
    )


def preflight(scale: str, overrides: Sequence[str] = ()) -> None:
    """Stop at once (one-line ``UserError``) if the model of ``scale``'s experiments is absent."""
    if scale not in SCALES:
        raise UserError(f"--scale must be one of {sorted(SCALES)}, got '{scale}'")
    for experiment in dict.fromkeys(SCALES[scale].main.values()):
        if not (CONF_DIR / "experiment" / f"{experiment}.yaml").is_file():
            raise UserError(f"experiment '{experiment}' is missing from {CONF_DIR / 'experiment'}")
        cfg = _compose([f"+experiment={experiment}", *overrides])
        check_weights(cfg.model)


def run_missing(
    cells: Sequence[Sequence[str]],
    extra: Sequence[str] = (),
    runner: Callable[[list[str]], int] | None = None,
) -> None:
    """Run the missing cells as multirun sweeps; a failed sweep ends the report with one line."""
    runner = runner or (lambda cmd: subprocess.call(cmd))
    for cmd in sweep_commands(cells, extra):
        log.info("running: %s", " ".join(cmd[1:]))
        rc = runner(cmd)
        if rc != 0:
            raise UserError(f"the sweep `{' '.join(cmd[2:])}` failed (exit {rc}); its log is above")


DEFAULT_RESULTS = ("results", "multirun", "outputs")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unlearn_exp.report", description=__doc__.splitlines()[0])
    p.add_argument("--scale", default="sd14", choices=sorted(SCALES))
    p.add_argument("--results", nargs="+", default=None, help="folders holding cells.parquet files")
    p.add_argument("--out", default="reports")
    p.add_argument("--no-run", action="store_true", help="only build tables from existing rows")
    p.add_argument("--pp", default="coco", choices=("coco", "bench"), help="the PP of the main tables")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for the runs, after --")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def body() -> int:
        results = args.results or [d for d in DEFAULT_RESULTS if Path(d).is_dir()]
        rows = load_cells(results)
        missing = missing_cells(rows, args.scale, args.overrides)
        if missing and not args.no_run:
            preflight(args.scale, args.overrides)
            extra = list(args.overrides)
            if args.results:
                extra.append(f"paths.results_dir={Path(args.results[0]).resolve()}")
            log.info("%d cell(s) missing: running them", len(missing))
            run_missing(missing, extra)
            results = args.results or [d for d in DEFAULT_RESULTS if Path(d).is_dir()]
            rows = load_cells(results)
            missing = missing_cells(rows, args.scale, args.overrides)
        written = write_report(rows, args.scale, args.out, find_cell_files(results), args.pp, args.overrides)
        if args.scale == "toy" and not args.no_run:  # the precondition of finding (a), per checkpoint
            from unlearn_exp import precondition

            precondition.run([f"+experiment={SCALES['toy'].main['toy']}", *args.overrides], args.out)
            written += [
                Path(args.out) / "toy" / "precondition.md",
                Path(args.out) / "toy" / "precondition.csv",
            ]
        print(
            f"wrote {len(written)} files under {Path(args.out) / args.scale}; {len(missing)} cell(s) without rows"
        )
        for cell in missing:
            print("  missing: " + " ".join(cell))
        return 0

    return exit_status(body)


if __name__ == "__main__":
    sys.exit(main())
