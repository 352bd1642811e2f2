"""The toy's guidance strengths, calibrated on the original toy model.

``python -m unlearn_exp.toy.calibrate [--model toy_mmdit] [--jobs N]``.

The rule, fixed before any rung was run (docs/toy.md 7):

- **Knobs.** SLD: its safety guidance scale ``s_S`` (Eq. 6, the knob of SLD's own presets; SLD acts
  only for ``s_S > 1``). SAFREE: its strength ``s`` (``guidance.strength``), which scales both of
  SAFREE's edits to the conditioning together, the negative prompt ``E("") + s (E(neg) - E(""))`` and
  the flagged tokens ``e + s (proj - e)``; 1 is SAFREE as published, 0 plain CFG.
- **Ladders** (``LADDERS``), today's value first and then weaker, ending low enough that some rung
  is expected to pass.
- **Measured** on the ORIGINAL toy model only (``checkpoint=original``), with the explicit words as
  the concept (``embedding=explicit``), on the benign prompts only (``benchmark=toy_benign``; the
  PP prompt set is the same benign set): benign accuracy (the share of the 48 benign images whose
  colour the toy judge finds as asked) and PP, at the demo's sampling and seeds. No unlearned
  checkpoint, no ``C*``, no DSR on the indirect prompts enter.
- **Choice** (``choose``): per method, the strongest rung (the first in ladder order) whose benign
  accuracy is at least ``BENIGN_FLOOR``; if none passes, the rung with the highest benign accuracy,
  and the report says that the rule was not met.

The report goes to ``reports/toy/calibration.md`` and ``calibration.csv``; the chosen values are
the root keys ``sld_guidance_scale`` and ``safree_strength`` of ``conf/experiment/toy_duo.yaml``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

from unlearn_exp.atomic import atomic_write_text
from unlearn_exp.errors import exit_status
from unlearn_exp.toy import TOY_MODELS, toy_model

BENIGN_FLOOR = 0.90
# method -> (the root key its guidance config reads, the rungs in order from today's value down)
LADDERS: dict[str, tuple[str, tuple[float, ...]]] = {
    "sld": ("sld_guidance_scale", (1000.0, 300.0, 100.0, 30.0, 10.0, 3.0)),
    "safree": ("safree_strength", (1.0, 0.8, 0.6, 0.4, 0.2, 0.1)),
}
TODAY = {"sld": 1000.0, "safree": 1.0}  # SLD medium's s_S; SAFREE as published
BASE = ["checkpoint=original", "embedding=explicit", "benchmark=toy_benign"]  # after the experiment
# the ladder as measured per toy model (benign accuracy per rung, docs/toy.md 7 and 8; both on
# 2026-12-07); each model's experiment carries the rule's choice on it (tests/test_toy_calibrate.py)
MEASURED = {
    "toy": {
        "sld": (0.646, 0.667, 0.729, 0.771, 0.875, 0.958),
        "safree": (0.625, 0.667, 0.792, 0.958, 0.958, 0.979),
    },
    "toy_mmdit": {
        "sld": (0.646, 0.646, 0.646, 0.667, 0.750, 0.917),
        "safree": (0.771, 0.958, 0.979, 1.000, 1.000, 1.000),
    },
}
# the paper's PP cost of guidance on SD v1.4 (docs/toy.md 7): DUO -> DUO+SLD / DUO+SAFREE
PAPER_PP_COST = {"sld": 0.03, "safree": 0.10}


def ladder_cells(extra: list[str] = (), model: str = "toy") -> list[tuple[str, float | None, list[str]]]:
    """``(method, value, overrides)`` of every rung, after the unguided reference cell, on the toy
    ``model``'s original checkpoint (its grid's experiment)."""
    base = [f"+experiment={toy_model(model).experiment}", *BASE]
    cells: list[tuple[str, float | None, list[str]]] = [("none", None, [*base, "guidance=none", *extra])]
    for method, (key, values) in LADDERS.items():
        for v in values:
            cells.append((method, v, [*base, f"guidance={method}", f"++{key}={v:g}", *extra]))
    return cells


def choose(rows: pd.DataFrame) -> dict[str, dict]:
    """The rule's choice per method from the ladder's rows (``method``, ``value``, ``benign_acc``)."""
    out = {}
    for method, (_, values) in LADDERS.items():
        got = rows[rows.method == method].set_index("value")
        missing = [v for v in values if v not in got.index]
        if missing:
            raise ValueError(f"{method}: rungs {missing} not measured")
        passing = [v for v in values if got.loc[v, "benign_acc"] >= BENIGN_FLOOR]
        if passing:
            out[method] = {"value": passing[0], "met": True}
        else:
            best = max(values, key=lambda v: (got.loc[v, "benign_acc"], -values.index(v)))
            out[method] = {"value": best, "met": False}
    return out


def to_markdown(rows: pd.DataFrame, chosen: dict[str, dict], header: str) -> str:
    ref = rows[rows.method == "none"].iloc[0]
    lines = [
        header,
        "",
        f"Unguided reference: benign accuracy {ref.benign_acc:.3f}, PP {ref.pp:.3f}.",
        "",
        "| method | knob | value | benign accuracy | PP | PP cost vs unguided | passes (>= "
        f"{BENIGN_FLOOR:.2f}) |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for method, (key, values) in LADDERS.items():
        for v in values:
            r = rows[(rows.method == method) & (rows.value == v)].iloc[0]
            mark = " (today)" if v == TODAY[method] else ""
            mark += " **chosen**" if v == chosen[method]["value"] else ""
            lines.append(
                f"| {method} | {key} | {v:g}{mark} | {r.benign_acc:.3f} | {r.pp:.3f} | "
                f"{ref.pp - r.pp:+.3f} | {'yes' if r.benign_acc >= BENIGN_FLOOR else 'no'} |"
            )
    lines.append("")
    for method, c in chosen.items():
        state = "the strongest rung that passes" if c["met"] else "NO rung passes: the rule is not met"
        lines.append(
            f"- {method}: {LADDERS[method][0]} = {c['value']:g} ({state}); the paper's PP cost on SD "
            f"v1.4: about {PAPER_PP_COST[method]:.2f}"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from unlearn_exp.demo import quiet_logs, run_grid_cell, run_in_workers

    ap = argparse.ArgumentParser(
        prog="python -m unlearn_exp.toy.calibrate", description=__doc__.splitlines()[0].strip('"')
    )
    ap.add_argument("--jobs", type=int, default=1, help="worker processes")
    ap.add_argument("--model", default="toy", choices=sorted(TOY_MODELS), help="the toy model")
    ap.add_argument("--out", default=None, help="calibration.md's folder (default: reports/<model>)")
    args, extra = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    quiet_logs()

    def body() -> int:
        start = time.time()
        cells = ladder_cells([*extra, "sampling.progress=false"], args.model)
        tasks = [(run_grid_cell, over) for _, _, over in cells]
        results = (
            ((i, run_grid_cell(over)) for i, (_, over) in enumerate(tasks))
            if args.jobs == 1
            else run_in_workers(tasks, args.jobs, 1)
        )
        rows = []
        for i, got in results:
            method, value, _ = cells[i]
            c = got["cell"]
            rows.append(
                {
                    "method": method,
                    "value": value,
                    "benign_acc": float(c["benign_acc"]),
                    "pp": float(c["pp_coco"]),
                    "cell_key": c["cell_key"],
                }
            )
            print(f"{method} {'' if value is None else f'{value:g}'}: benign accuracy {c['benign_acc']:.3f}")
        table = pd.DataFrame(rows)
        chosen = choose(table)
        header = (
            f"# The toy's guidance calibration, on the original toy model ({args.model})\n\n"
            f"`python -m unlearn_exp.toy.calibrate {' '.join(sys.argv[1:] if argv is None else argv)}`"
            f" ({len(rows)} cells, {time.time() - start:.0f} s). Rule fixed before the run "
            "(`unlearn_exp/toy/calibrate.py`, docs/toy.md 7)."
        )
        out = Path(args.out or f"reports/{toy_model(args.model).scale}")
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "calibration.csv", table.to_csv(index=False))
        text = to_markdown(table, chosen, header)
        atomic_write_text(out / "calibration.md", text)
        print("\n" + text + f"\nwritten: {out / 'calibration.md'}, {out / 'calibration.csv'}")
        return 0

    return exit_status(body)


if __name__ == "__main__":
    sys.exit(main())
