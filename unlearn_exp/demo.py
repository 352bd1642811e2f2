"""``make demo``: the paper's grid on the toy world, on the CPU, and its table.

Runs every cell of ``+experiment=toy_duo`` (DUO at four betas x none/SLD/SAFREE x explicit/inverted/
shared) in this process through the same cell runner as ``python -m unlearn_exp``, reusing cached
artifacts, then prints the main table and the transfer table and writes them under ``reports/toy/``,
and measures the precondition of finding (a) per checkpoint (``precondition.py``).
Extra Hydra overrides may follow: ``python -m unlearn_exp.demo +debug=default``.

``--methods`` runs the methods grid instead (``+experiment=toy_methods``: the original model, DUO,
ESD-u, ESD-x and UCE x guidance x concept source; ``make demo-methods``) and prints its table; with
``--model toy_mmdit``, the toy MMDiT's (``+experiment=toy_mmdit_methods``).

``--model toy_mmdit`` runs the same grid on the toy world's second model, the MMDiT of the SD3
family (``+experiment=toy_mmdit_duo``, ``make demo MODEL=toy_mmdit``; docs/toy.md 8); its tables go to
``reports/toy_mmdit/``.

``--jobs N`` runs the cells in N worker processes (the machine's cores split between them; ``make demo
JOBS=N``): the same cells through the same runner, so the same numbers, sooner where one process
cannot keep every core busy.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from unlearn_exp.config import (  # noqa: F401  (grid: the sweep's cells, used by tools)
    compose,
    grid,
    override_key,
    pinned_axes,
    sweep_params,
)
from unlearn_exp.errors import exit_status
from unlearn_exp.quiet import quiet_lightning
from unlearn_exp.toy import TOY_MODELS, ToyModel

EXPERIMENT = TOY_MODELS["toy"].experiment


def quiet_logs() -> None:
    """Warnings and the demo's own lines only: Lightning's info lines and tips are kept out
    (``quiet.quiet_lightning``); every real warning still shows."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    quiet_lightning()


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    quiet_logs()


def unet_rows() -> int:
    """UNet rows (one image, one branch, one denoising step) sampled in this process so far, read
    without importing the sampler: 0 where it never ran."""
    return int(getattr(sys.modules.get("unlearn_exp.sampling"), "UNET_ROWS", 0))


def run_grid_cell(overrides: list[str]) -> dict:
    """One cell (in this process or a worker): what the demo prints and tabulates of it."""
    from unlearn_exp.cell import run_cell

    rows = unet_rows()
    out = run_cell(compose(overrides))
    return {
        "cell": {**out["cell"], "_source": str(Path(out["results"]) / "cells.parquet")},
        "built": len(out["artifacts"]["built"]),
        "timings": out.get("timings", {}),
        "reused": bool(out.get("reused_result")),
        "unet_rows": unet_rows() - rows,
    }


def run_probe(overrides: list[str]) -> dict:
    """One direction probe of the precondition (cached like a cell), and the seconds it took."""
    from unlearn_exp.precondition import direction_alignment

    t, rows = time.time(), unet_rows()
    direction_alignment(compose(overrides))
    return {"timings": {"probe": time.time() - t}, "unet_rows": unet_rows() - rows}


def run_in_workers(
    tasks: list[tuple[Callable, list[str]]], jobs: int, threads: int
) -> Iterator[tuple[int, dict]]:
    """``(i, fn(overrides))`` for every task ``i`` as it finishes, in ``jobs`` spawned worker processes
    of ``threads`` torch threads each. A failed task stops the run: nothing new is started."""
    ctx = multiprocessing.get_context("spawn")  # no fork after torch's thread pools started
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init, initargs=(threads,)) as pool:
        futures = {pool.submit(fn, over): i for i, (fn, over) in enumerate(tasks)}
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _parse(argv: list[str]) -> tuple[int, bool, str, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m unlearn_exp.demo", add_help=True)
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1: this process)")
    parser.add_argument("--methods", action="store_true", help="the toy model's methods grid (toy_methods)")
    parser.add_argument(
        "--model", default="toy", choices=sorted(TOY_MODELS), help="the toy model: toy (UNet) or toy_mmdit"
    )
    args, extra = parser.parse_known_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    return args.jobs, args.methods, args.model, extra


def methods_main(jobs: int, extra: list[str], model: str = "toy") -> int:
    """``--methods``: every cell of the toy model's methods grid, then its table
    (``reports/toy/methods_toy.*``, ``reports/toy_mmdit/methods_toy_mmdit.*``)."""
    from unlearn_exp.report.render import to_markdown, write_table
    from unlearn_exp.report.tables import methods_table, with_identity

    toy = TOY_MODELS[model]
    experiment = toy.methods
    base = [f"+experiment={experiment}", *extra]
    start = time.time()

    def body() -> int:
        cells = grid(base)
        runs = [[*unswept(base, cells), *cell, "sampling.progress=false"] for cell in cells]
        print(f"toy methods grid: {len(cells)} cells ({experiment}); ESD and UCE are trained here once")
        done: dict[int, dict] = {}

        def show(i: int, got: dict) -> None:
            c = got["cell"]
            print(
                f"[{len(done):2d}/{len(cells)}] {' '.join(cells[i]):58s} DSR {c['dsr']:.3f}"
                f" [{c['dsr_lo']:.2f}, {c['dsr_hi']:.2f}]  PP {c['pp_coco']:.3f}"
                f"  benign {c['benign_acc']:.2f}  (elapsed {time.time() - start:.0f} s)"
                + (f"  FLAG: {c['flag']}" if c["flag"] else ""),
                flush=True,
            )

        if jobs == 1:
            for i, over in enumerate(runs):
                done[i] = run_grid_cell(over)
                show(i, done[i])
        else:
            threads = max(1, (os.cpu_count() or 1) // jobs)
            for i, got in run_in_workers([(run_grid_cell, over) for over in runs], jobs, threads):
                done[i] = got
                show(i, got)
        rows = with_identity(pd.DataFrame([done[i]["cell"] for i in range(len(cells))]))
        table = methods_table(rows, experiment, toy.scale, extra=tuple(table_overrides(base, extra)))
        written = write_table(table, Path("reports") / toy.scale)
        print(f"\n{to_markdown(table)}")
        print(f"\n{len(cells)} cells in {time.time() - start:.0f} s; table: {Path(written[0]).parent}")
        return 0

    return exit_status(body)


def unswept(base: list[str], cells: list[list[str]], lists_only: bool = False) -> list[str]:
    """``base`` without the overrides of the keys each cell sets itself (a pinned comma list would
    not compose beside the cell's own value); ``lists_only``: only those that are comma lists."""
    own = {override_key(o) for o in (cells[0] if cells else [])}
    return [o for o in base if override_key(o) not in own or (lists_only and "," not in o.split("=", 1)[-1])]


def table_overrides(base: list[str], extra: list[str]) -> list[str]:
    """``extra`` without the keys the experiment sweeps: the grid ran only their values (``grid``),
    and the tables show the other positions as '-' rather than fill them with the pinned cell (one
    line says so)."""
    pinned = pinned_axes(extra, sweep_params(base))
    if pinned:
        which = ", ".join(f"{k}={v}" for k, v in pinned.items())
        print(f"tables: the overrides pin {which}; the other positions show '-'")
    return [o for o in extra if override_key(o) not in pinned]


@dataclass
class _GridRun:
    """The toy grid's run so far: its cells, their results, stage seconds and UNet rows sampled."""

    cells: list[list[str]]
    start: float
    done: dict[int, dict] = field(default_factory=dict)
    stage_s: dict[str, float] = field(default_factory=dict)
    reused: int = 0
    unet: dict[str, int] = field(default_factory=lambda: {"cells": 0, "precondition": 0})  # over the workers


def _show_cell(run: _GridRun, i: int, got: dict, took: float) -> None:
    """Tally cell ``i``'s result (already in ``run.done``) and print its line, with the ETA."""
    run.reused += got["reused"]
    run.unet["cells"] += got["unet_rows"]
    for stage, sec in got["timings"].items():
        run.stage_s[stage] = run.stage_s.get(stage, 0.0) + sec
    c, n = got["cell"], len(run.done)
    elapsed = time.time() - run.start
    eta = elapsed / n * (len(run.cells) - n)  # from the cells finished so far
    print(
        f"[{n:2d}/{len(run.cells)}] {' '.join(run.cells[i]):55s} DSR {c['dsr']:.3f}"
        f" [{c['dsr_lo']:.2f}, {c['dsr_hi']:.2f}]"
        f"  PP {c['pp_coco']:.3f}  benign {c['benign_acc']:.2f}  ({took:.0f} s, {got['built']} built;"
        f" elapsed {elapsed:.0f} s, ETA {eta:.0f} s)" + (f"  FLAG: {c['flag']}" if c["flag"] else ""),
        flush=True,
    )


def _run_here(run: _GridRun, runs: list[list[str]]) -> None:
    """``--jobs 1``: the grid's cells one after another in this process."""
    for i, over in enumerate(runs):
        t = time.time()
        run.done[i] = run_grid_cell(over)
        _show_cell(run, i, run.done[i], time.time() - t)


def _run_workers(run: _GridRun, runs: list[list[str]], base: list[str], jobs: int) -> tuple[int, float]:
    """The grid's cells and the precondition's cells and probes in ``jobs`` worker processes; the
    torch threads of each and the precondition's seconds (summed over the workers)."""
    from unlearn_exp import precondition

    _, _, pre_cells, probes = precondition.measurements(unswept(base, run.cells, lists_only=True))
    tasks = [(run_grid_cell, over) for over in runs]
    tasks += [(run_grid_cell, over) for over in pre_cells.values()]
    tasks += [(run_probe, over) for over in probes.values()]
    threads, pre_s = max(1, (os.cpu_count() or 1) // jobs), 0.0
    for i, got in run_in_workers(tasks, jobs, threads):
        if i >= len(runs):  # the precondition's: its time is reported as the precondition's
            pre_s += sum(got["timings"].values())
            run.unet["precondition"] += got["unet_rows"]
            continue
        run.done[i] = got
        _show_cell(run, i, got, sum(got["timings"].values()))
    return threads, pre_s


def _write_grid_report(
    run: _GridRun, base: list[str], extra: list[str], scale: str
) -> tuple[dict, list[Path]]:
    """The grid's tables, plots and sources under ``reports/<scale>``; the tables and the files written."""
    from unlearn_exp.report import build_tables, write_report

    rows = [run.done[i]["cell"] for i in range(len(run.cells))]
    df = pd.DataFrame(rows)
    fixed = table_overrides(base, extra)  # each table position keeps its own beta, guidance, ...
    tables = build_tables(df, scale, extra=fixed)
    files = [Path(p) for p in df["_source"]]
    written = write_report(df, scale, "reports", files=files, extra=fixed, tables=tables)
    return tables, written


def _measure_precondition(run: _GridRun, base: list[str], pre_s: float):
    """The precondition of finding (a) under ``reports/toy`` (cached where workers ran it), timed."""
    from unlearn_exp import precondition

    t, before = time.time(), unet_rows()
    pre = precondition.run(unswept(base, run.cells, lists_only=True), "reports")  # cached with workers
    run.stage_s["precondition"] = pre_s + time.time() - t
    run.unet["precondition"] += unet_rows() - before
    return pre


def _print_tables(tables: dict, pre) -> None:
    """The long and transfer tables, then the precondition's, as markdown."""
    from unlearn_exp import precondition
    from unlearn_exp.report import to_markdown

    for name, table in tables.items():
        if name.startswith(("long", "transfer")):
            print(f"\n{to_markdown(table)}")
    print(f"\n{precondition.to_markdown(pre)}")


def _summary(run: _GridRun, jobs: int, threads: int, written: list[Path], denoiser: str = "UNet") -> str:
    """The last line: cells, seconds, results reused, stage times and the denoiser rows sampled."""
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in run.stage_s.items())
    how = "" if jobs == 1 else f"; {jobs} workers of {threads} threads, stage times summed over the workers"
    n_rows = run.unet["cells"] + run.unet["precondition"]
    work = (
        f"; {n_rows} {denoiser} rows sampled, {run.unet['precondition']} of them by the precondition"
        if n_rows
        else ""
    )
    return (
        f"\n{len(run.cells)} cells in {time.time() - run.start:.0f} s ({run.reused} recorded results reused; "
        f"{stages}{how}"
        f"{work}); tables and plots: {Path(written[0]).parent}"
    )


def _grid_main(
    jobs: int, base: list[str], extra: list[str], start: float, toy: ToyModel = TOY_MODELS["toy"]
) -> int:
    """The toy grid: its cells, its report, the precondition, the tables printed and the last line."""
    cells = grid(base)
    runs = [[*unswept(base, cells), *cell, "sampling.progress=false"] for cell in cells]
    print(f"toy grid: {len(cells)} cells ({toy.experiment}); artifacts are cached, so a second run is fast")
    run = _GridRun(cells, start)
    if jobs == 1:
        _run_here(run, runs)
        threads, pre_s = 0, 0.0
    else:  # the grid's cells and the precondition's cells and probes, in worker processes
        threads, pre_s = _run_workers(run, runs, base, jobs)
    tables, written = _write_grid_report(run, base, extra, toy.scale)
    pre = _measure_precondition(run, base, pre_s)
    _print_tables(tables, pre)
    print(_summary(run, jobs, threads, written, toy.denoiser))
    return 0


def main(argv: list[str] | None = None) -> int:
    quiet_logs()
    jobs, methods, model, extra = _parse(list(sys.argv[1:] if argv is None else argv))
    if methods:
        return methods_main(jobs, extra, model)
    toy = TOY_MODELS[model]
    base = [f"+experiment={toy.experiment}", *extra]
    start = time.time()
    return exit_status(_grid_main, jobs, base, extra, start, toy)


if __name__ == "__main__":
    sys.exit(main())
