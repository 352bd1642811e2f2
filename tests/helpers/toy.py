"""Overrides of a small toy cell, and a small demo run."""

from __future__ import annotations

from pathlib import Path


def toy_overrides(root: Path, *extra: str) -> list[str]:
    """A small toy cell (4 benchmark images, 4 benign ones, 4 steps) with its own cache and results."""
    own_benchmark = any(e.startswith("benchmark=") for e in extra)
    return [
        "+experiment=toy_duo",
        "checkpoint.beta=2000",
        "guidance=none",
        *([] if own_benchmark else ["benchmark.n=4"]),
        "pp.prompts.n=4",
        "sampling.steps=4",
        "sampling.chunk_size=2",
        "sampling.progress=false",
        f"paths.root_dir={root}",
        f"paths.output_root={root}",
        *extra,
    ]


def small_demo(monkeypatch, root: Path, cells: list[list[str]]) -> list[str]:
    """``python -m unlearn_exp.demo`` cut down for a test: the grid is ``cells``, the precondition
    measures beta 2000 only; returns the overrides of 2 prompts per set at beta 2000 under ``root``."""
    from unlearn_exp import demo, precondition

    monkeypatch.chdir(root)
    monkeypatch.setattr(demo, "grid", lambda base: cells)
    real = precondition.measurements

    def one_beta(base):
        name, _, pre_cells, probes = real(base)
        return name, [2000], {k: v for k, v in pre_cells.items() if k[0] == 2000}, {2000: probes[2000]}

    monkeypatch.setattr(precondition, "measurements", one_beta)
    return [
        "checkpoint.beta=2000",
        "benchmark.n=2",
        "pp.prompts.n=2",
        "sampling.chunk_size=2",
        f"paths.root_dir={root}",
        f"paths.output_root={root}",
    ]
