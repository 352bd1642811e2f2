"""Reproduction planning: the cells the tables need that have no row, the sweeps that make them, the
weights check before running, and the ``python -m unlearn_exp.report`` command."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from unlearn_exp.config import CONF_DIR, compose
from unlearn_exp.errors import UserError, exit_status
from unlearn_exp.families import required_parts
from unlearn_exp.report.render import write_report
from unlearn_exp.report.tables import (
    SCALES,
    as_frame,
    find_cell_files,
    grid_positions,
    load_cells,
    match_position,
    of_scale,
    with_identity,
)

log = logging.getLogger("unlearn_exp.report")


# ----------------------------------------------------------------------------- missing cells and running them
def task_order(scale: str, task: str = "all") -> list[str]:
    """The tasks of ``scale`` a report run covers, nudity first (its judge ships in a wheel: a
    missing violence file never blocks it); ``task`` is one of them or ``all``."""
    tasks = sorted(SCALES[scale].main, key=lambda t: (t != "nudity", t))
    if task != "all" and task not in tasks:
        raise UserError(f"--task must be one of {['all', *tasks]} for scale '{scale}', got '{task}'")
    return tasks if task == "all" else [task]


def task_experiments(scale: str, task: str) -> set[str]:
    """The experiments whose cells make ``task``'s tables (its main grid, and the transfer table's)."""
    spec = SCALES[scale]
    label, transfer = spec.transfer
    return {spec.main[task], *([transfer] if label == task else [])}


def missing_cells(results, scale: str, extra: Sequence[str] = (), task: str = "all") -> list[list[str]]:
    """Hydra overrides (one list per cell) for every position the tables of ``scale`` (of ``task``
    only, unless ``all``) need and lack, nudity's first.

    ``results``: a DataFrame of cell rows, or result folder(s). DUO alone (guidance none) is run
    with ``embedding=explicit``: its embedding axis is ignored, the cell computed once.
    """
    if scale not in SCALES:
        raise UserError(f"--scale must be one of {sorted(SCALES)}, got '{scale}'")
    rows = with_identity(of_scale(as_frame(results), scale))
    out: list[list[str]] = []
    positions = grid_positions(scale, extra)
    for t in task_order(scale, task):
        wanted = {f"+experiment={e}" for e in task_experiments(scale, t)}
        for pos in positions:
            if pos.overrides[0] not in wanted or list(pos.overrides) in out:
                continue
            if match_position(rows, pos) is None:
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


def check_weights(model_cfg) -> None:
    """Raise a one-line ``UserError`` unless the weights ``model_cfg`` names are on this machine.

    Only local files and the Hugging Face cache are looked at (no download): this runs before any work.
    """
    if model_cfg.get("source", "pretrained") != "pretrained":
        return
    path = model_cfg.get("path")
    folder = str(path or model_cfg.get("name")).rstrip("/").rsplit("/", 1)[-1]
    hint = (
        f"pass model.path=/path/to/{folder} (a diffusers folder; through make: "
        'make reproduce-table ARGS="model.path=..."), or run `make demo` for the toy world'
    )
    if not path:
        raise UserError(f"no weights configured for model '{model_cfg.get('name')}': {hint}")
    local = Path(str(path)).expanduser()
    if local.exists():
        # the layout check of models.pretrained.resolve_checkpoint, without importing torch (a
        # second here matters: this runs before any work)
        need = required_parts(model_cfg)
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
        f"no weights for model '{model_cfg.get('name')}' at model.path='{path}' "
        f"(not a local folder, not in the Hugging Face cache): {hint}"
    )


def preflight(scale: str, overrides: Sequence[str] = (), task: str = "all") -> None:
    """Stop at once (one ``UserError``) if the model of ``scale``'s experiments (``task``'s) is
    absent, or any other file their cells need that no run fetches by itself (``assets``)."""
    if scale not in SCALES:
        raise UserError(f"--scale must be one of {sorted(SCALES)}, got '{scale}'")
    from unlearn_exp.assets import missing_lines, sweep_assets

    missing: list[str] = []
    for t in task_order(scale, task):
        experiment = SCALES[scale].main[t]
        if not (CONF_DIR / "experiment" / f"{experiment}.yaml").is_file():
            raise UserError(f"experiment '{experiment}' is missing from {CONF_DIR / 'experiment'}")
        cfg = compose([f"+experiment={experiment}", *overrides])
        check_weights(cfg.model)
        for exp in sorted(task_experiments(scale, t)):  # every cell of the task's sweeps
            found = missing_lines(sweep_assets([f"+experiment={exp}", *overrides]))
            missing += [m for m in found if m not in missing]
    if missing:
        raise UserError(
            f"{task if task != 'all' else scale}: {len(missing)} file(s) are missing: " + "; ".join(missing)
        )


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


def _parser() -> argparse.ArgumentParser:
    """The command line of ``python -m unlearn_exp.report``."""
    p = argparse.ArgumentParser(
        prog="python -m unlearn_exp.report",
        description="make reproduce-table: cell rows -> the paper's tables beside ours, plots, provenance",
    )
    p.add_argument("--scale", default="sd14", choices=sorted(SCALES))
    p.add_argument("--results", nargs="+", default=None, help="folders holding cells.parquet files")
    p.add_argument("--out", default="reports")
    p.add_argument("--no-run", action="store_true", help="only build tables from existing rows")
    p.add_argument(
        "--task",
        default="all",
        help="run the missing cells of this task only (nudity, violence, toy) or all, nudity first; the "
        "tables of every task are written from the rows there are",
    )
    p.add_argument("--pp", default="coco", choices=("coco", "bench"), help="the PP of the main tables")
    p.add_argument(
        "--judges",
        default=None,
        help="A,B,...: instead of the tables, the recorded cells' DSR under these judge profiles "
        "(conf/judge options) from the same images, with Cohen's kappa per cell",
    )
    p.add_argument(
        "--utility",
        default=None,
        help="A,B,...: instead of the tables, utility metrics (conf/utility options: clip_score, fid, "
        "kid, toy_*) of the recorded cells' benign images",
    )
    p.add_argument(
        "--utility-columns",
        default=None,
        help="A,B,...: add these utility metrics as columns of the main and long tables",
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides for the runs, after --")
    return p


def _results(args: argparse.Namespace) -> list[str]:
    """The result folders: ``--results``, else those of ``DEFAULT_RESULTS`` that exist now."""
    return args.results or [d for d in DEFAULT_RESULTS if Path(d).is_dir()]


def _table_mode(args: argparse.Namespace, arg: str, module: str, what: str) -> int:
    """``--judges`` / ``--utility``: a table over the recorded cells instead of the report."""
    import importlib

    m = importlib.import_module(f"unlearn_exp.report.{module}")
    names = [n.strip() for n in arg.split(",") if n.strip()]
    results = _results(args)
    table = getattr(m, f"{what}_table")(results, names, args.overrides)
    written = getattr(m, f"write_{what}")(table, names, Path(args.out) / args.scale)
    print(getattr(m, f"render_{what}")(table, names), end="")
    print(f"wrote {', '.join(map(str, written))}")
    return 0


def _run_missing_tasks(args: argparse.Namespace, rows) -> None:
    """Run every task's missing cells, nudity first, each task's files checked before its cells."""
    extra = list(args.overrides)
    if args.results:
        extra.append(f"paths.results_dir={Path(args.results[0]).resolve()}")
    for task in task_order(args.scale, args.task):
        todo = missing_cells(rows, args.scale, args.overrides, task)
        if todo:
            preflight(args.scale, args.overrides, task)
            log.info("%s: %d cell(s) missing: running them", task, len(todo))
            run_missing(todo, extra)


def _utility_tables(args: argparse.Namespace, rows) -> dict | None:
    """``--utility-columns``: the tables with those utility metrics as columns; None without it."""
    if not args.utility_columns:
        return None
    from unlearn_exp.report.tables import build_tables
    from unlearn_exp.report.utility import add_utility_columns

    tables = build_tables(rows, args.scale, args.pp, args.overrides)
    names = [n.strip() for n in args.utility_columns.split(",") if n.strip()]
    add_utility_columns(tables, names, args.overrides)
    return tables


def _write_precondition(args: argparse.Namespace) -> list[Path]:
    """A toy model's precondition of finding (a), per checkpoint, under ``<out>/<scale>``; the files
    written."""
    from unlearn_exp import precondition

    precondition.run([f"+experiment={SCALES[args.scale].main['toy']}", *args.overrides], args.out)
    return [
        Path(args.out) / args.scale / "precondition.md",
        Path(args.out) / args.scale / "precondition.csv",
    ]


def _report(args: argparse.Namespace) -> int:
    """The report: the missing cells run (unless ``--no-run``), then the tables from the rows there are."""
    results = _results(args)
    rows = load_cells(results)
    task_order(args.scale, args.task)  # an unknown task is one line before any work
    if not args.no_run:
        _run_missing_tasks(args, rows)
        results = _results(args)
        rows = load_cells(results)
    missing = missing_cells(rows, args.scale, args.overrides, args.task)
    tables = _utility_tables(args, rows)
    files = find_cell_files(results)
    written = write_report(rows, args.scale, args.out, files, args.pp, args.overrides, tables=tables)
    if args.scale in ("toy", "toy_mmdit") and not args.no_run:  # finding (a)'s precondition, per checkpoint
        written += _write_precondition(args)
    print(
        f"wrote {len(written)} files under {Path(args.out) / args.scale}; {len(missing)} cell(s) without rows"
    )
    for cell in missing:
        print("  missing: " + " ".join(cell))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.judges is not None:
        return exit_status(_table_mode, args, args.judges, "judges", "judges")
    if args.utility is not None:
        return exit_status(_table_mode, args, args.utility, "utility", "utility")
    return exit_status(_report, args)


if __name__ == "__main__":
    sys.exit(main())
