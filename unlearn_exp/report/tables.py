"""Result rows -> the report's tables: which row fills which table position (by ``spec_key``), the
paper's numbers beside ours, N-consistency and SAFREE-mode notes, and the rows that fit no position."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd

from unlearn_exp import paper
from unlearn_exp.config import compose, override_key
from unlearn_exp.errors import UserError
from unlearn_exp.evaluation.records import CELL_IDENTITY
from unlearn_exp.hashing import config_hash, to_plain
from unlearn_exp.identity import cell_spec, spec_differences, spec_key

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


# ----------------------------------------------------------------------------- what each scale needs
@dataclass(frozen=True)
class ScaleSpec:
    """Which experiments define the tables of one scale.

    ``main`` maps a table label (the task) to the experiment whose cells make its main and long
    tables; ``transfer`` is (label, experiment) for the transfer table (embedding=shared);
    ``generated`` is the benchmark of prompts generated against the model (Ring-A-Bell), whose cells
    (the same grid with ``benchmark=<generated>``) give the long table's "DSR (generated attacks)".
    """

    main: dict[str, str]
    transfer: tuple[str, str]
    checkpoint_method: str = "duo"
    generated: str | None = None
    methods: dict[str, str] = field(default_factory=dict)  # task -> its methods-grid experiment
    paper_model: str | None = None  # the paper's columns are another model's (said in every title)


SCALES: dict[str, ScaleSpec] = {
    "sd14": ScaleSpec(
        main={"violence": "violence_duo", "nudity": "nudity_duo"},
        transfer=("nudity", "nudity_duo_transfer"),
        generated="ring_a_bell_generated",
        methods={"violence": "violence_methods", "nudity": "nudity_methods"},
    ),
    # the paper's question on Stable Diffusion 3 (docs/model_families.md); no generated-attack
    # experiment yet
    "sd3": ScaleSpec(
        main={"violence": "violence_duo_sd3", "nudity": "nudity_duo_sd3"},
        transfer=("nudity", "nudity_duo_sd3_transfer"),
        methods={"violence": "violence_methods_sd3", "nudity": "nudity_methods_sd3"},
        paper_model="SD v1.4",
    ),
    "toy": ScaleSpec(
        main={"toy": "toy_duo"},
        transfer=("toy", "toy_duo"),
        generated="toy_ring_a_bell_generated",
        methods={"toy": "toy_methods"},
    ),
    # the toy world's second model, the MMDiT of the SD3 family (docs/toy.md 8)
    "toy_mmdit": ScaleSpec(
        main={"toy": "toy_mmdit_duo"}, transfer=("toy", "toy_mmdit_duo"), methods={"toy": "toy_mmdit_methods"}
    ),
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
            # quarantined results (rows that contradicted themselves) are kept for inspection, not read
            found.update(q for q in p.rglob("cells.parquet") if q.is_file() and "quarantine" not in q.parts)
    return sorted(found)


def load_cells(paths: Iterable[str | Path], *, strict: bool = False) -> pd.DataFrame:
    """All cell rows under ``paths``, one per ``cell_key`` (the last file in path order wins), with the
    attack success rate of cells that ``stage=attack`` ran on (``asr``, ``asr_lo``, ``asr_hi``).

    Each row is checked against itself and the image rows beside it (``records.row_problems``): one
    that contradicts itself is left out with a warning (its position shows as missing and a run
    recomputes it), or, with ``strict``, is one ``UserError``."""
    paths = list(paths)
    frames = []
    for f in find_cell_files(paths):
        try:
            df = pd.read_parquet(f)
        except Exception as e:
            raise UserError(f"cannot read cell rows from '{f}': {e}") from e
        absent = [c for c in CELL_COLUMNS if c not in df.columns and c not in OPTIONAL_COLUMNS]
        if absent:
            raise UserError(f"cell rows in '{f}' lack the column(s) {absent}")
        df = _consistent(df, f, strict)
        frames.append(df.assign(_source=str(f)))
    if not frames:
        return pd.DataFrame(columns=[*CELL_COLUMNS, "_source"])
    rows = pd.concat(frames, ignore_index=True)
    rows = rows.drop_duplicates("cell_key", keep="last").reset_index(drop=True)
    return _with_attacks(rows, paths)


def _consistent(df: pd.DataFrame, f: Path, strict: bool) -> pd.DataFrame:
    """``df`` without the rows that contradict themselves or their image rows (see ``load_cells``)."""
    from unlearn_exp.evaluation.records import row_problems

    beside = f.with_name("images.parquet")
    try:
        images = pd.read_parquet(beside) if beside.is_file() else None
    except Exception:
        images = None  # an unreadable image table: the row is checked on its own
    keep = []
    for _, row in df.iterrows():
        problems = row_problems(row.to_dict(), images)
        if problems and strict:
            raise UserError(f"recorded cell {row.get('cell_key')} in '{f}' contradicts itself: {problems[0]}")
        if problems:
            log.warning(
                "recorded cell %s in %s contradicts itself (%s): left out of the tables; a run recomputes it",
                row.get("cell_key"),
                f,
                "; ".join(problems),
            )
        keep.append(not problems)
    return df[keep]


def _with_attacks(rows: pd.DataFrame, paths: list) -> pd.DataFrame:
    """Join the recorded attack results (``attack.load_attacks``) on ``spec_key``; rows of cells no
    attack ran on get no value, and with no attack recorded the rows are returned unchanged."""
    from unlearn_exp.attack import load_attacks

    attacks = load_attacks(paths)
    if attacks.empty or "spec_key" not in rows:
        return rows
    several = attacks[attacks.duplicated("spec_key", keep=False)]
    if not several.empty:
        log.warning(
            "%d cell(s) were attacked with several settings: the report shows the newest",
            several["spec_key"].nunique(),
        )
    attacks = attacks.drop_duplicates("spec_key", keep="last")[["spec_key", "asr", "asr_lo", "asr_hi"]]
    return rows.merge(attacks, on="spec_key", how="left")


def as_frame(results) -> pd.DataFrame:
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


def _method_of(cfg, group: str) -> Any:
    """What a group's option is (its ``method`` or ``name``): another option of the same method
    (``checkpoint=duo`` for the toy's ``duo_toy``) keeps a position's meaning, another method not."""
    node = cfg.get(group)
    return None if node is None else node.get("method", node.get("name"))


@lru_cache(maxsize=512)
def position(overrides: tuple[str, ...], extra: tuple[str, ...] = ()) -> Position:
    """Compose ``overrides + extra`` as the app would and compute the cell's identity. A position keeps
    the values its row and column name: an ``extra`` override of a key the position sets, or of the
    group holding it where it picks another method (``checkpoint=esd`` for DUO's rows), is one
    ``UserError``, never applied to every position."""
    own = {override_key(o) for o in overrides}
    cfg = compose([*overrides, *extra])
    for o in extra:
        k = override_key(o)
        holds = any(s.startswith(k + ".") for s in own)  # a group whose keys the position sets
        if k in own or (holds and _method_of(cfg, k) != _method_of(compose(list(overrides)), k)):
            raise UserError(
                f"the override '{o}' sets {k}, which the tables sweep (each position names its own "
                f"value): leave it out; positions without a recorded cell show '-'"
            )
    spec = cell_spec(cfg)
    return Position(
        overrides=tuple(overrides),
        key=spec_key(spec),
        loose_key=config_hash(_loose(spec)),
        spec=spec,
        model_resolved=spec["model"]["content"] is not None,
        extra=tuple(extra),
    )


def with_identity(rows: pd.DataFrame) -> pd.DataFrame:
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


def match_position(rows: pd.DataFrame, pos: Position) -> pd.Series | None:
    """The row whose identity is exactly the position's, or None. Several rows with that identity
    are the same computation run again: the newest is taken."""
    if rows.empty:
        return None
    rows = with_identity(rows)
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
    kind: str = "f3"  # text | f3 | diff | int | ci | g4 | grid


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
    if kind == "grid":  # one cell of the methods grid: DSR [interval] (PP, benign accuracy)
        dsr, lo, hi = row[f"{key}:dsr"], row[f"{key}:dsr_lo"], row[f"{key}:dsr_hi"]
        if pd.isna(dsr):
            return MISSING
        pp, acc = row[f"{key}:pp"], row[f"{key}:benign_acc"]
        tail = ", ".join(f"{v:.2f}" if not pd.isna(v) else MISSING for v in (pp, acc))
        return f"{dsr:.3f} [{lo:.2f}, {hi:.2f}] ({tail})" + (" *" if row[f"{key}:flag"] else "")
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
    if kind == "g4":  # four significant digits (utility metrics: KID is small, FID large)
        return f"{v:.4g}"
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
        **({"asr": _num(row, "asr")} if row is not None and not math.isnan(_num(row, "asr")) else {}),
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
        prompts = to_plain(compose([*pos.overrides, *pos.extra]).benchmark).get("expected_prompts")
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


def _cells(
    rows, experiment, label, betas, pp_col, extra, generated: str | None = None
) -> tuple[pd.DataFrame, list[pd.Series], list[str]]:
    recs, used, paper_dsr, ns = [], [], [], []
    # cells of the same grid on prompts generated against the model: looked up only where some exist
    generated = generated if generated and _has_benchmark(rows, generated) else None
    for beta in betas:
        for method in paper.METHODS:
            guidance, embedding = paper.METHOD_CELLS[method]
            over = cell_overrides(experiment, beta, guidance, embedding)
            pos = position(over, tuple(extra))
            row = match_position(rows, pos)
            if row is not None:
                used.append(row)
            rec = _method_row(row, method, label, beta, pp_col)
            if generated:
                gen = match_position(rows, position(over, (*extra, f"benchmark={generated}")))
                rec["dsr_generated"] = _num(gen, "dsr")
                if gen is not None:
                    used.append(gen)
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


def _has_benchmark(rows: pd.DataFrame, name: str) -> bool:
    return not rows.empty and "benchmark" in rows and bool((rows["benchmark"].astype(str) == name).any())


def long_table(
    rows: pd.DataFrame, experiment: str, label: str, pp: str = "coco", extra=(), generated: str | None = None
) -> Table:
    """The five methods at every beta; the paper's numbers appear at its main beta only. Where cells
    of the grid on ``generated`` prompts (attacks made against the model) or attack results exist,
    their columns are added."""
    data, used, notes = _cells(rows, experiment, label, list(paper.BETAS), _pp_column(pp), extra, generated)
    cols = [
        Column("beta", "beta", r"$\beta$", "int"),
        *_MAIN_COLUMNS[:8],
        Column("pp_coco", "PP (COCO)", "PP (COCO)"),
        Column("pp_bench", "PP (bench)", "PP (bench)"),
        *_MAIN_COLUMNS[8:],
    ]
    if "dsr_generated" in data:  # the same cell on Ring-A-Bell prompts generated against the model
        cols.append(Column("dsr_generated", "DSR (generated attacks)", "DSR (generated attacks)"))
    if "asr" in data:  # cells that stage=attack ran on: the share of its targets it made unsafe
        cols.append(Column("asr", "ASR (UnlearnDiffAtk)", "ASR (UnlearnDiffAtk)"))
    title = f"{label.capitalize()}, DUO at all betas (paper numbers at beta={main_beta(label)} only)"
    return Table(f"long_{label}", title, data, cols, used, notes)


def transfer_table(rows: pd.DataFrame, task: str, experiment: str, extra=()) -> Table:
    """C* learned on DUO beta=500 used on the other betas (embedding=shared), DSR (docs/methods.md 1.2)."""
    recs, used, paper_dsr, ns = [], [], [], []
    for beta in sorted(paper.TRANSFER_NUDITY):
        rec: dict = {"beta": beta}
        for method, guidance in paper.TRANSFER_METHODS.items():
            pos = position(cell_overrides(experiment, beta, guidance, "shared"), tuple(extra))
            row = match_position(rows, pos)
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


# ----------------------------------------------------------------------------- the methods grid
SOURCE_NAMES = ("words", "own C*", "shared C*")  # the sweep's embedding options, in their order


def method_label(checkpoint: dict[str, Any]) -> str:
    """A checkpoint as the methods table names it: DUO with its beta, ESD by its variant."""
    method = str(checkpoint.get("method"))
    if method == "duo":
        return f"DUO beta={float(checkpoint['beta']):g}"
    if method == "esd":
        return "ESD-" + str(checkpoint.get("variant") or "esd-u").split("-", 1)[1]
    return {"original": "original", "uce": "UCE", "spm": "SPM"}.get(method, method)


def methods_axes(experiment: str) -> tuple[list[str], list[str], list[str]]:
    """The methods experiment's sweep: checkpoint options, guidance options, embedding options."""
    params = compose([f"+experiment={experiment}"], hydra=True).hydra.sweeper.params
    return tuple(str(params[k]).split(",") for k in ("checkpoint", "guidance", "embedding"))  # type: ignore[return-value]


def methods_table(rows: pd.DataFrame, experiment: str, label: str, pp: str = "coco", extra=()) -> Table:
    """One row per unlearning method of ``experiment`` (its sweep), one column per guidance and
    concept source: DSR with its Wilson interval, (PP, benign accuracy); * where the cell is flagged.
    Each position takes only the cell whose identity is the one the experiment gives it."""
    pp_col = _pp_column(pp)
    checkpoints, guidances, embeddings = methods_axes(experiment)
    columns = [("none", embeddings[0], "no guidance")]
    columns += [
        (g, e, f"{g.upper()} {name}")
        for g in guidances
        if g != "none"
        for e, name in zip(embeddings, SOURCE_NAMES, strict=False)
    ]
    recs, used = [], []
    for option in checkpoints:
        base = (f"+experiment={experiment}", f"checkpoint={option}")
        ck = to_plain(compose([*base, *extra]).checkpoint)
        rec: dict[str, Any] = {"method": method_label(ck), "option": option}
        for g, e, _ in columns:
            pos = position((*base, f"guidance={g}", f"embedding={e}"), tuple(extra))
            row = match_position(rows, pos)
            if row is not None:
                used.append(row)
            key = f"{g}:{e}"
            rec |= {
                f"{key}:dsr": _num(row, "dsr"),
                f"{key}:dsr_lo": _num(row, "dsr_lo"),
                f"{key}:dsr_hi": _num(row, "dsr_hi"),
                f"{key}:pp": _num(row, pp_col),
                f"{key}:benign_acc": _num(row, "benign_acc"),
                f"{key}:flag": bool(_text(row, "flag")),
            }
        recs.append(rec)
    cols = [Column("method", "Method", "Method", "text")]
    cols += [Column(f"{g}:{e}", header, header, "grid") for g, e, header in columns]
    bench = paper.BENCHMARK.get(label, label)
    title = (
        f"{label.capitalize()} ({bench}): unlearning methods x guidance x concept source, "
        "DSR [95% CI] (PP, benign accuracy); * flagged"
    )
    return Table(f"methods_{label}", title, pd.DataFrame(recs), cols, used, [])


# ----------------------------------------------------------------------------- the whole report
def of_scale(rows: pd.DataFrame, scale: str) -> pd.DataFrame:
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
    rows = with_identity(of_scale(rows, scale))
    tables: dict[str, Table] = {}
    for label, experiment in spec.main.items():
        for t in (
            main_table(rows, experiment, label, pp, extra),
            long_table(rows, experiment, label, pp, extra, spec.generated),
        ):
            tables[t.name] = t
    t_label, t_exp = spec.transfer
    t = transfer_table(rows, t_label, t_exp, extra)
    tables[t.name] = t
    for label, experiment in spec.methods.items():  # only where the methods grid has been run
        if not rows.empty and (rows["experiment"].astype(str) == experiment).any():
            t = methods_table(rows, experiment, label, pp, extra)
            tables[t.name] = t
    tables["other_cells"] = other_cells_table(rows, scale, extra, tables)
    pp_label = _pp_label(grid_positions(scale, extra))
    for t in tables.values():
        _name_what_was_measured(t, pp_label, pp)
        if spec.paper_model and any(c.key.endswith("_paper") for c in t.columns):
            t.title += f" [the paper's columns are {spec.paper_model}'s, beside {scale}]"
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
    data = pd.DataFrame(recs, columns=[*dict.fromkeys(c.key for c in _OTHER_COLUMNS), "dsr_lo", "dsr_hi"])
    title = f"Other cells ({scale}): rows that are not a table position, never mixed into the tables above"
    return Table("other_cells", title, data.reset_index(drop=True), _OTHER_COLUMNS)
