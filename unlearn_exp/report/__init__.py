"""``make reproduce-table``: cell rows -> the paper's tables beside ours, plots, provenance.

Three files: ``tables.py`` (which row fills which position; the tables and their notes),
``render.py`` (Markdown, LaTeX, CSV, plots, the report folder), ``reproduce.py`` (the missing cells,
the sweeps that make them, the command).

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

from unlearn_exp.report.render import to_csv, to_latex, to_markdown, write_report, write_table
from unlearn_exp.report.reproduce import main, missing_cells, preflight, run_missing, sweep_commands
from unlearn_exp.report.tables import (
    SCALES,
    Table,
    build_tables,
    cell_overrides,
    find_cell_files,
    formatted,
    load_cells,
    position,
)

__all__ = [
    "SCALES",
    "Table",
    "build_tables",
    "cell_overrides",
    "find_cell_files",
    "formatted",
    "load_cells",
    "main",
    "missing_cells",
    "position",
    "preflight",
    "run_missing",
    "sweep_commands",
    "to_csv",
    "to_latex",
    "to_markdown",
    "write_report",
    "write_table",
]
