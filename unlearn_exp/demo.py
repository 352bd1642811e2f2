"""``make demo``: the paper's grid on the toy world, on the CPU, and its table.

Runs every cell of ``+experiment=toy_duo`` (DUO at four betas x none/SLD/SAFREE x explicit/inverted/
shared) in this process through the same cell runner as ``python -m unlearn_exp``, reusing cached
artifacts, then prints the main table and the transfer table and writes them under ``reports/toy/``,
and measures the precondition of finding (a) per checkpoint (``precondition.py``).
Extra Hydra overrides may follow: ``python -m unlearn_exp.demo +debug=default``.
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
import warnings
from pathlib import Path

import pandas as pd

from unlearn_exp.config import compose
from unlearn_exp.errors import exit_status

EXPERIMENT = "toy_duo"


def _compose(overrides: list[str], hydra: bool = False):
    return compose(overrides, hydra=hydra)


def grid(overrides: list[str]) -> list[list[str]]:
    """The sweep of the experiment as lists of overrides; cells with guidance=none once."""
    params = _compose(overrides, hydra=True).hydra.sweeper.params
    axes = [[f"{k}={v}" for v in str(vals).split(",")] for k, vals in params.items()]
    cells, seen = [], set()
    for combo in itertools.product(*axes):
        combo = list(combo)
        if "guidance=none" in combo:  # the embedding axis is ignored: run it once
            combo = [c if not c.startswith("embedding=") else "embedding=explicit" for c in combo]
        if tuple(combo) not in seen:
            seen.add(tuple(combo))
            cells.append(combo)
    return cells


def main(argv: list[str] | None = None) -> int:
    from unlearn_exp.cell import run_cell
    from unlearn_exp.report import build_tables, to_markdown, write_report

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    warnings.filterwarnings("ignore")  # library deprecation notices; errors still stop the demo
    extra = list(sys.argv[1:] if argv is None else argv)
    base = [f"+experiment={EXPERIMENT}", *extra]
    start = time.time()

    def body() -> int:
        cells = grid(base)
        print(f"toy grid: {len(cells)} cells ({EXPERIMENT}); artifacts are cached, so a second run is fast")
        rows, stage_s, reused = [], {}, 0
        for i, cell in enumerate(cells, 1):
            t = time.time()
            out = run_cell(_compose([*base, *cell, "sampling.progress=false"]))
            reused += bool(out.get("reused_result"))
            for stage, s in out.get("timings", {}).items():
                stage_s[stage] = stage_s.get(stage, 0.0) + s
            c = {**out["cell"], "_source": str(Path(out["results"]) / "cells.parquet")}
            built = len(out["artifacts"]["built"])
            elapsed = time.time() - start
            eta = elapsed / i * (len(cells) - i)  # from the cells finished so far
            print(
                f"[{i:2d}/{len(cells)}] {' '.join(cell):55s} DSR {c['dsr']:.3f} [{c['dsr_lo']:.2f}, {c['dsr_hi']:.2f}]"
                f"  PP {c['pp_coco']:.3f}  benign {c['benign_acc']:.2f}  ({time.time() - t:.0f} s, {built} built;"
                f" elapsed {elapsed:.0f} s, ETA {eta:.0f} s)" + (f"  FLAG: {c['flag']}" if c["flag"] else "")
            )
            rows.append(c)
        df = pd.DataFrame(rows)
        tables = build_tables(df, "toy", extra=extra)
        written = write_report(df, "toy", "reports", files=[Path(p) for p in df["_source"]], extra=extra)
        from unlearn_exp import precondition

        t = time.time()
        pre = precondition.run(base, "reports")
        stage_s["precondition"] = time.time() - t
        for name, table in tables.items():
            if name.startswith(("long", "transfer")):
                print(f"\n{to_markdown(table)}")
        print(f"\n{precondition.to_markdown(pre)}")
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in stage_s.items())
        print(
            f"\n{len(cells)} cells in {time.time() - start:.0f} s ({reused} recorded results reused; {stages}); "
            f"tables and plots: {Path(written[0]).parent}"
        )
        return 0

    return exit_status(body)


if __name__ == "__main__":
    sys.exit(main())
