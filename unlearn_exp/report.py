"""``make reproduce-table``: cell rows -> the paper's tables beside ours, plots, provenance.

``python -m unlearn_exp.report --scale {sd14,toy} [--results DIR ...] [--out reports] [--no-run]
[-- hydra overrides]``

Reads the per-job cell rows (``cells.parquet`` files, DESIGN.md section 4 "Results") found under
the results folders, and writes under ``<out>/<scale>/``:

- ``main_<task>_beta<B>.{md,tex,csv}``: the main table of each task (violence at beta=1000,
  nudity at beta=2000, METHOD.md 1.2) with the paper's numbers and the differences (ours - paper);
- ``long_<task>.{md,tex,csv}``: the same five methods at all four betas;
- ``transfer.{md,tex,csv}``: C* learned on beta=500, used on the other betas (embedding=shared);
- ``dsr_pp_<task>.png``: DSR against PP per task;
- ``sources.md``: judge profiles, model / checkpoint / embedding identities and cells used.

A cell with no row shows "-": nothing is invented. Unless ``--no-run`` is given, the cells the
tables need that have no row are first run through ``python -m unlearn_exp`` (cached artifacts are
reused by the store), after ``preflight`` checked that the model weights are present.
"""

from __future__ import annotations

import argparse
import logging
import math
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from unlearn_exp import paper
from unlearn_exp.errors import UserError
from unlearn_exp.evaluation.records import CELL_IDENTITY
from unlearn_exp.store import atomic_file, atomic_write_text

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
MISSING = "-"
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


# ----------------------------------------------------------------------------- what each scale needs
@dataclass(frozen=True)
class ScaleSpec:
    """Which experiments feed the tables of one scale.

    ``main`` maps a task to the experiment that sweeps it (task None: whatever task the
    experiment's rows carry, used by the toy world whose task name is its own). ``transfer`` is
    (task, experiment used to run missing transfer cells, experiments whose shared rows count).
    """

    main: dict[str | None, str]
    transfer: tuple[str | None, str, tuple[str, ...]]
    checkpoint_method: str = "duo"


SCALES: dict[str, ScaleSpec] = {
    "sd14": ScaleSpec(
        main={"violence": "violence_duo", "nudity": "nudity_duo"},
        transfer=("nudity", "nudity_duo_transfer", ("nudity_duo_transfer", "nudity_duo")),
    ),
    "toy": ScaleSpec(main={None: "toy_duo"}, transfer=(None, "toy_duo", ("toy_duo",))),
}
TOY_TASK_LABEL = "toy"  # table name for the toy world before any of its rows exist


def main_beta(task: str) -> int:
    """The beta of a task's main table: the paper's (METHOD.md 1.2), else the largest beta."""
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
        absent = [c for c in CELL_COLUMNS if c not in df.columns]
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


# ----------------------------------------------------------------------------- picking the row of a cell
def _match(rows: pd.DataFrame, *, experiments, task, beta, guidance, embedding) -> pd.Series | None:
    """The row of one table cell, or None. A cell whose guidance is none ignores the embedding axis.

    Several distinct rows for one cell (e.g. a debug run beside a full one) resolve to the one with
    the most images, then the last read; ``sources.md`` lists the row used.
    """
    if rows.empty:
        return None
    m = rows["experiment"].isin(experiments) & (rows["guidance"] == guidance)
    if task is not None:
        m &= rows["task"] == task
    m &= pd.to_numeric(rows["beta"], errors="coerce").sub(float(beta)).abs() < 1e-9
    if guidance != "none" and embedding is not None:
        m &= rows["embedding"] == embedding
    hit = rows[m]
    if hit.empty:
        return None
    order = hit.assign(
        _pref=(hit["embedding"] == "explicit").astype(int),
        _n=pd.to_numeric(hit["n_images"], errors="coerce").fillna(0),
        _i=range(len(hit)),
    ).sort_values(["_n", "_pref", "_i"])
    return order.iloc[-1]


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
        "cell_key": None if row is None else str(row["cell_key"]),
    }


def _cells(rows, experiments, task, betas, pp_col) -> tuple[pd.DataFrame, list[pd.Series]]:
    recs, used = [], []
    for beta in betas:
        for method in paper.METHODS:
            guidance, embedding = paper.METHOD_CELLS[method]
            row = _match(
                rows, experiments=experiments, task=task, beta=beta, guidance=guidance, embedding=embedding
            )
            if row is not None:
                used.append(row)
            recs.append(_method_row(row, method, task, beta, pp_col))
    return pd.DataFrame(recs), used


def main_table(rows: pd.DataFrame, task: str | None, experiments, label: str, pp: str = "coco") -> Table:
    """The five methods at the task's main beta, beside the paper's numbers (METHOD.md 1.2)."""
    beta = main_beta(label)
    data, used = _cells(rows, experiments, task, [beta], _pp_column(pp))
    bench = paper.BENCHMARK.get(label, label)
    title = f"{label.capitalize()} ({bench}), DUO beta={beta}: ours beside the paper (diff = ours - paper)"
    return Table(f"main_{label}_beta{beta}", title, data, _MAIN_COLUMNS, used)


def long_table(rows: pd.DataFrame, task: str | None, experiments, label: str, pp: str = "coco") -> Table:
    """The five methods at every beta; the paper's numbers appear at its main beta only."""
    data, used = _cells(rows, experiments, task, list(paper.BETAS), _pp_column(pp))
    cols = [
        Column("beta", "beta", r"$\beta$", "int"),
        *_MAIN_COLUMNS[:8],
        Column("pp_coco", "PP (COCO)", "PP (COCO)"),
        Column("pp_bench", "PP (bench)", "PP (bench)"),
        *_MAIN_COLUMNS[8:],
    ]
    title = f"{label.capitalize()}, DUO at all betas (paper numbers at beta={main_beta(label)} only)"
    return Table(f"long_{label}", title, data, cols, used)


def transfer_table(rows: pd.DataFrame, task: str | None, experiments) -> Table:
    """C* learned on DUO beta=500 used on the other betas (embedding=shared), DSR (METHOD.md 1.2)."""
    recs, used = [], []
    for beta in sorted(paper.TRANSFER_NUDITY):
        rec: dict = {"beta": beta}
        for method, guidance in paper.TRANSFER_METHODS.items():
            row = _match(
                rows, experiments=experiments, task=task, beta=beta, guidance=guidance, embedding="shared"
            )
            if row is not None:
                used.append(row)
            # the paper's transfer numbers are for nudity; the toy world (task None) has none
            ref = paper.reported_transfer(beta, method) if task == "nudity" else None
            dsr = _num(row, "dsr")
            rec[f"{method}:dsr"] = dsr
            rec[f"{method}:dsr_lo"] = _num(row, "dsr_lo")
            rec[f"{method}:dsr_hi"] = _num(row, "dsr_hi")
            rec[f"{method}:paper"] = ref.dsr if ref else math.nan
            rec[f"{method}:diff"] = _diff(dsr, ref.dsr if ref else None)
            rec[f"{method}:pp"] = _num(row, "pp_coco")
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
    return Table("transfer", title, pd.DataFrame(recs), cols, used)


# ----------------------------------------------------------------------------- rendering
def to_markdown(table: Table) -> str:
    f = formatted(table)
    align = ["---" if c.kind == "text" else "---:" for c in table.columns]
    lines = [f"**{table.title}**", "", "| " + " | ".join(f.columns) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in f.itertuples(index=False)]
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
    """DSR against PP: one marker per method, one colour per beta; the paper's points hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = dict(zip(paper.METHODS, "osD^v"))
    colours = dict(zip(paper.BETAS, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for _, r in long.data.iterrows():
        c = colours.get(int(r["beta"]), "k")
        if not (pd.isna(r["dsr"]) or pd.isna(r["pp"])):
            ax.scatter(r["pp"], r["dsr"], marker=markers[r["method"]], color=c, s=40)
        if not (pd.isna(r["dsr_paper"]) or pd.isna(r["pp_paper"])):
            ax.scatter(
                r["pp_paper"],
                r["dsr_paper"],
                marker=markers[r["method"]],
                facecolors="none",
                edgecolors=c,
                s=60,
            )
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker=mk, color="grey", label=m) for m, mk in markers.items()]
    handles += [Line2D([], [], ls="", marker="o", color=c, label=f"beta={b}") for b, c in colours.items()]
    handles.append(Line2D([], [], ls="", marker="o", mfc="none", color="k", label="paper"))
    ax.legend(handles=handles, fontsize=7, loc="best")
    ax.set_xlabel("PP (prior preservation, higher is better)")
    ax.set_ylabel("DSR (defense success rate, higher is better)")
    ax.set_title(f"{label}: DSR against PP")
    ax.grid(alpha=0.3)
    path = out / f"dsr_pp_{label}.png"
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def sources_md(rows_used: Sequence[pd.Series], files: Sequence[Path], scale: str) -> str:
    """Judge profiles, model / checkpoint / embedding identities and the cells behind the tables."""
    lines = [f"# Sources of the {scale} tables", ""]
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
def _tasks(rows: pd.DataFrame, spec: ScaleSpec) -> list[tuple[str | None, str, tuple[str, ...]]]:
    """(task filter, label, experiments) per main table of a scale."""
    out = []
    for task, experiment in spec.main.items():
        if task is not None:
            out.append((task, task, (experiment,)))
            continue
        sub = rows[rows["experiment"] == experiment] if not rows.empty else rows
        names = sorted(set(sub["task"].astype(str))) if not sub.empty else []
        if not names:
            out.append((None, TOY_TASK_LABEL, (experiment,)))
        out += [(t, t, (experiment,)) for t in names]
    return out


def build_tables(rows: pd.DataFrame, scale: str, pp: str = "coco") -> dict[str, Table]:
    """Every table of ``scale`` from cell rows (already loaded), keyed by table name."""
    if scale not in SCALES:
        raise UserError(f"--scale must be one of {sorted(SCALES)}, got '{scale}'")
    spec = SCALES[scale]
    rows = rows[rows["scale"].astype(str) == scale] if not rows.empty else rows
    tables: dict[str, Table] = {}
    for task, label, experiments in _tasks(rows, spec):
        for t in (
            main_table(rows, task, experiments, label, pp),
            long_table(rows, task, experiments, label, pp),
        ):
            tables[t.name] = t
    t_task, _, t_exps = spec.transfer
    t = transfer_table(rows, t_task, t_exps)
    tables[t.name] = t
    return tables


def write_report(rows: pd.DataFrame, scale: str, out: str | Path, files=(), pp: str = "coco") -> list[Path]:
    """Write every table, plot and the sources file under ``<out>/<scale>/``; return the paths."""
    out = Path(out) / scale
    tables = build_tables(rows, scale, pp)
    written, used = [], []
    for t in tables.values():
        written += write_table(t, out)
        used += t.used
        if t.name.startswith("long_"):
            written.append(plot_dsr_pp(t, t.name[len("long_") :], out))
    written.append(atomic_write_text(out / "sources.md", sources_md(used, list(files), scale)))
    return written


# ----------------------------------------------------------------------------- missing cells and running them
def missing_cells(results, scale: str) -> list[list[str]]:
    """Hydra overrides (one list per cell) for every cell the tables of ``scale`` need and lack.

    ``results``: a DataFrame of cell rows, or result folder(s). DUO alone (guidance none) is run
    with ``embedding=explicit``: its embedding axis is ignored, the cell computed once.
    """
    if scale not in SCALES:
        raise UserError(f"--scale must be one of {sorted(SCALES)}, got '{scale}'")
    rows = _as_frame(results)
    rows = rows[rows["scale"].astype(str) == scale] if not rows.empty else rows
    spec = SCALES[scale]
    out: list[list[str]] = []
    for task, experiment in spec.main.items():
        for beta in paper.BETAS:
            for method in paper.METHODS:
                guidance, embedding = paper.METHOD_CELLS[method]
                hit = _match(
                    rows,
                    experiments=(experiment,),
                    task=task,
                    beta=beta,
                    guidance=guidance,
                    embedding=embedding,
                )
                if hit is None:
                    out.append(
                        [
                            f"+experiment={experiment}",
                            f"checkpoint.beta={beta}",
                            f"guidance={guidance}",
                            f"embedding={embedding or 'explicit'}",
                        ]
                    )
    t_task, t_exp, t_exps = spec.transfer
    for beta in sorted(paper.TRANSFER_NUDITY):
        for guidance in paper.TRANSFER_METHODS.values():
            hit = _match(
                rows, experiments=t_exps, task=t_task, beta=beta, guidance=guidance, embedding="shared"
            )
            if hit is None:
                out.append(
                    [
                        f"+experiment={t_exp}",
                        f"checkpoint.beta={beta}",
                        f"guidance={guidance}",
                        "embedding=shared",
                    ]
                )
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
    hint = "pass model.path=/path/to/stable-diffusion-v1-4 (a diffusers folder), or run `make demo` for the toy world"
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
    try:
        results = args.results or [d for d in DEFAULT_RESULTS if Path(d).is_dir()]
        rows = load_cells(results)
        missing = missing_cells(rows, args.scale)
        if missing and not args.no_run:
            preflight(args.scale, args.overrides)
            extra = list(args.overrides)
            if args.results:
                extra.append(f"paths.results_dir={Path(args.results[0]).resolve()}")
            log.info("%d cell(s) missing: running them", len(missing))
            run_missing(missing, extra)
            results = args.results or [d for d in DEFAULT_RESULTS if Path(d).is_dir()]
            rows = load_cells(results)
            missing = missing_cells(rows, args.scale)
        written = write_report(rows, args.scale, args.out, find_cell_files(results), args.pp)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print(
        f"wrote {len(written)} files under {Path(args.out) / args.scale}; {len(missing)} cell(s) without rows"
    )
    for cell in missing:
        print("  missing: " + " ".join(cell))
    return 0


if __name__ == "__main__":
    sys.exit(main())
