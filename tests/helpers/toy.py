"""Overrides of a small toy cell."""

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
