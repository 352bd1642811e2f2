"""Writing the report: tables as Markdown, LaTeX and CSV, the DSR-vs-PP plots, ``sources.md`` and the
whole report folder (atomically)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from unlearn_exp import paper
from unlearn_exp.atomic import atomic_file, atomic_write_text
from unlearn_exp.config import compose
from unlearn_exp.hashing import config_hash
from unlearn_exp.report.tables import MISSING, SCALES, Table, build_tables, formatted, grid_positions

log = logging.getLogger("unlearn_exp.report")


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


# One colour per method: a hue per guidance (grey: none, blue: SLD, orange: SAFREE), light for the
# explicit concept and dark for the learned one (+Ours); one marker per beta, smaller for larger betas
# (drawn later), so that points at the same place nest instead of hiding each other. Every point is
# told apart by the legend alone: labels printed at the markers pile up where points share a DSR (1.0).
METHOD_COLOURS = dict(zip(paper.METHODS, ("#525252", "#6baed6", "#08519c", "#fd8d3c", "#a63603")))
BETA_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
DSR_PP_LAYOUT = 2  # part of the plot's cache key: a new layout draws every plot again


def dsr_pp_figure(long: Table, label: str):
    """The DSR-PP figure of a long table (Agg backend; the caller closes it): DSR against PP with the
    Wilson 95% interval as error bars, colour by method, marker by beta (sorted numerically), the
    paper's points hollow; the legend, beside the axes, lists the methods, betas and "paper" that
    have points, and no point carries a text label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    pp_header = next((c.header for c in long.columns if c.key == "pp"), "PP")
    betas = sorted({int(b) for b in long.data["beta"].dropna()})
    markers = {b: BETA_MARKERS[i % len(BETA_MARKERS)] for i, b in enumerate(betas)}
    sizes = {b: max(10.0 - 1.5 * i, 4.0) for i, b in enumerate(betas)}
    fig, ax = plt.subplots(figsize=(8, 5))
    shown_methods, shown_betas, paper_shown = set(), set(), False
    for _, r in long.data.sort_values("beta", kind="stable").iterrows():
        if pd.isna(r["beta"]):
            continue
        beta, colour = int(r["beta"]), METHOD_COLOURS.get(r["method"], "k")
        if not (pd.isna(r["dsr"]) or pd.isna(r["pp"])):
            lo, hi = r.get("dsr_lo"), r.get("dsr_hi")
            yerr = (
                None if pd.isna(lo) or pd.isna(hi) else [[max(r["dsr"] - lo, 0.0)], [max(hi - r["dsr"], 0.0)]]
            )
            ax.errorbar(
                r["pp"],
                r["dsr"],
                yerr=yerr,
                fmt=markers[beta],
                color=colour,
                mec="white",
                mew=0.6,
                ms=sizes[beta],
                alpha=0.9,
                capsize=2,
                lw=0.8,
            )
            shown_methods.add(r["method"])
            shown_betas.add(beta)
        if not (pd.isna(r["dsr_paper"]) or pd.isna(r["pp_paper"])):
            ax.scatter(
                r["pp_paper"],
                r["dsr_paper"],
                marker=markers[beta],
                facecolors="none",
                edgecolors=colour,
                s=(sizes[beta] + 2) ** 2,
            )
            shown_methods.add(r["method"])
            shown_betas.add(beta)
            paper_shown = True
    handles = [
        Line2D([], [], ls="", marker="s", ms=7, color=c, label=m)
        for m, c in METHOD_COLOURS.items()
        if m in shown_methods
    ]
    handles += [
        Line2D([], [], ls="", marker=markers[b], ms=sizes[b], color="grey", label=f"beta={b}")
        for b in betas
        if b in shown_betas
    ]
    if paper_shown:
        handles.append(Line2D([], [], ls="", marker="o", ms=7, mfc="none", color="k", label="paper"))
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    ax.set_xlabel(f"{pp_header}: prior preservation, higher is better")
    ax.set_ylabel("DSR (Wilson 95% CI), higher is better")
    ax.set_title(f"{label}: DSR against PP")
    ax.margins(x=0.05, y=0.05)  # a point at DSR 1.0 or PP 1.0 is drawn whole, inside the frame
    ax.grid(alpha=0.3)
    return fig


def plot_dsr_pp(long: Table, label: str, out: Path) -> Path:
    """``<out>/dsr_pp_<label>.png``: ``dsr_pp_figure``. A plot already drawn from the same points and
    layout (its key in the PNG's metadata) is kept as it is."""
    from unlearn_exp.grids import png_key

    path = out / f"dsr_pp_{label}.png"
    pp_header = next((c.header for c in long.columns if c.key == "pp"), "PP")
    shown = [
        c
        for c in ("method", "beta", "dsr", "dsr_lo", "dsr_hi", "pp", "dsr_paper", "pp_paper")
        if c in long.data
    ]
    points = long.data.sort_values("beta")[shown].to_json(orient="split", index=False, double_precision=15)
    key = config_hash({"label": label, "pp": pp_header, "points": points, "layout": DSR_PP_LAYOUT})
    if path.is_file() and png_key(path) == key:
        return path
    import matplotlib.pyplot as plt

    fig = dsr_pp_figure(long, label)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png", metadata={"unlearn_exp_key": key})
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


def log_grids(grids: list[dict], scale: str, experiment: str, extra, out: Path) -> None:
    """With ``logger=wandb`` among the overrides: one run ``report-<scale>`` holding each grid as an
    image and its tiles as captioned images ("column | prompt | verdict")."""
    from unlearn_exp.tracking import Tracker

    logger_cfg = compose([f"+experiment={experiment}", *extra]).logger
    if str(logger_cfg.get("name")) != "wandb":
        return
    tracker = Tracker(logger_cfg, dir=out).start(
        {"name": f"report-{scale}", "stage": "report"}, tags=["report"]
    )
    tracker.log_grids(grids)
    tracker.finish()


def write_report(
    rows: pd.DataFrame,
    scale: str,
    out: str | Path,
    files=(),
    pp: str = "coco",
    extra: Sequence[str] = (),
    grids: bool = True,
    tables: dict | None = None,
) -> list[Path]:
    """Write every table, plot and the sources file under ``<out>/<scale>/``; return the paths.
    ``tables``: ``build_tables(rows, scale, pp, extra)`` where the caller has built them already."""
    out = Path(out) / scale
    tables = tables if tables is not None else build_tables(rows, scale, pp, extra)
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
        tiles: list[dict] = []
        written += write_grids(longs, SCALES[scale].main, out, list(extra), tiles=tiles)
        if tiles:
            log_grids(tiles, scale, next(iter(SCALES[scale].main.values())), extra, out)
    return written
