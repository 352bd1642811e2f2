"""The precondition of the paper's finding (a), measured per checkpoint, on any model.

Finding (a) says explicit-word guidance fails on an unlearned model because the model no longer
reacts to the words, while the concept stays reachable through indirect prompts. Two measurements
say whether a checkpoint is in that regime:

1. DSR without guidance on explicit, synonym and indirect prompts (the toy world's three prompt
   kinds): unlearning that suppresses the words more than the indirect routes shows a higher DSR on
   explicit prompts than on indirect ones.
2. The alignment of the two guidance directions on the indirect prompts' own (unguided) trajectories:
   the cosine between ``eps(words) - eps(uncond)`` and ``eps(C*) - eps(uncond)`` at every step, averaged
   over steps and images. Where the words still carry the concept, the directions agree and
   explicit-word guidance can work; where the model stopped reacting to the words they diverge.

``python -m unlearn_exp.precondition [overrides]`` runs both for every beta of the
toy_duo sweep (cells are cached like any other) and writes ``reports/toy/precondition.{md,csv}``;
with ``+experiment=E`` another experiment's sweep, written to ``precondition_E.{md,csv}`` (the toy
MMDiT's grid, ``toy_mmdit_duo``: ``reports/toy_mmdit/precondition.{md,csv}``).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from unlearn_exp.atomic import atomic_write_json, atomic_write_text
from unlearn_exp.config import compose
from unlearn_exp.errors import exit_status
from unlearn_exp.identity import cell_spec
from unlearn_exp.toy import TOY_MODELS

log = logging.getLogger("unlearn_exp")

PROMPT_KINDS = ("explicit", "synonym", "indirect")


def direction_alignment(cfg, *, batch_size: int = 16) -> dict[str, float]:
    """Mean and spread of the words-vs-``C*`` cosine on the benchmark prompts' unguided trajectories
    of the cell ``cfg`` (its checkpoint, its ``C*``: ``embedding`` must be inverted or shared), cached
    in the store as ``precondition/<hash>`` by the cell's identity and the probe's words."""
    from unlearn_exp.cell import cell_store

    store = cell_store(cfg)
    key = {"cell": cell_spec(cfg), "words": str(cfg.task.sld_concept), "batch_size": batch_size}

    def build(tmp: Path) -> None:
        atomic_write_json(tmp / "alignment.json", _measure_alignment(cfg, batch_size))

    return json.loads((store.get_or_build("precondition", key, build) / "alignment.json").read_text())


def _measure_alignment(cfg, batch_size: int) -> dict[str, float]:
    import torch

    from unlearn_exp.cell import benchmark_rows, concept, open_cell, originals, unlearn
    from unlearn_exp.guidance.probe import DirectionProbe
    from unlearn_exp.sampling import sample

    cell = open_cell(cfg, prompts=False)  # the cell runner's stages 0-2: image set, checkpoint, C*
    learned = concept(cell, originals(cell), unlearn(cell)).concept
    comps = cell.comps
    rows, _ = benchmark_rows(cfg.benchmark, cfg.paths.data_dir)
    probe = DirectionProbe(str(cfg.task.sld_concept), list(learned.tokens))
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            part = rows[start : start + batch_size]
            sample(
                comps,
                [r["prompt"] for r in part],
                [int(r["seed"]) for r in part],
                probe,
                scheduler=str(cfg.sampling.scheduler),
                steps=int(cfg.sampling.steps),
                guidance_scale=float(cfg.sampling.guidance_scale),
            )
    cos = torch.cat(probe.cosines)  # every step of every image
    return {"cos_mean": float(cos.mean()), "cos_sd": float(cos.std()), "n_images": len(rows)}


def precondition_table(
    dsr: dict[tuple[int, str], dict[str, Any]], alignment: dict[int, dict]
) -> pd.DataFrame:
    """One row per beta: DSR [95% CI] per prompt kind without guidance, and the direction cosine."""
    recs = []
    for beta in sorted({b for b, _ in dsr} | set(alignment)):
        rec: dict[str, Any] = {"beta": beta}
        for kind in PROMPT_KINDS:
            cell = dsr.get((beta, kind))
            rec[f"dsr_{kind}"] = cell["dsr"] if cell else float("nan")
            rec[f"ci_{kind}"] = f"[{cell['dsr_lo']:.2f}, {cell['dsr_hi']:.2f}]" if cell else "-"
        a = alignment.get(beta, {})
        rec["cos_words_cstar"] = a.get("cos_mean", float("nan"))
        rec["cos_sd"] = a.get("cos_sd", float("nan"))
        recs.append(rec)
    return pd.DataFrame(recs)


def to_markdown(table: pd.DataFrame) -> str:
    lines = [
        "**Precondition of finding (a): does unlearning suppress the words more than the indirect routes?**",
        "",
        "DSR without guidance per prompt kind (Wilson 95% CI), and the cosine between the guidance",
        "directions of the explicit words and of C* on the indirect prompts' unguided trajectories.",
        "",
        "| beta | DSR explicit | DSR synonym | DSR indirect | cos(words, C*) |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in table.itertuples(index=False):
        cells = [f"{getattr(r, f'dsr_{k}'):.3f} {getattr(r, f'ci_{k}')}" for k in PROMPT_KINDS]
        lines.append(f"| {r.beta} | " + " | ".join(cells) + f" | {r.cos_words_cstar:.3f} ± {r.cos_sd:.3f} |")
    return "\n".join(lines) + "\n"


def measurements(
    base: list[str],
) -> tuple[str, list[int], dict[tuple[int, str], list[str]], dict[int, list[str]]]:
    """The experiment's name, its betas, the DSR cells ((beta, prompt kind) -> overrides) and the
    direction probes (beta -> overrides of the cell whose ``C*`` is probed)."""
    composed = compose(base, hydra=True)
    params = composed.hydra.sweeper.params
    betas = [int(b) for b in str(params["checkpoint.beta"]).split(",")]
    cells = {
        (beta, kind): [
            *base,
            f"checkpoint.beta={beta}",
            "guidance=none",
            f"benchmark=toy_{kind}",
            "sampling.progress=false",
        ]
        for beta in betas
        for kind in PROMPT_KINDS
    }
    probes = {
        beta: [*base, f"checkpoint.beta={beta}", "guidance=sld", "embedding=inverted"] for beta in betas
    }
    return str(composed.name), betas, cells, probes


def run(base: list[str], out: str | Path = "reports", progress=print) -> pd.DataFrame:
    """Every beta of the experiment's sweep: the three DSRs (cells, cached) and the alignment."""
    from unlearn_exp.cell import run_cell

    name, betas, cells, probes = measurements(base)
    grids = {m.experiment: m.scale for m in TOY_MODELS.values()}  # a toy model's grid: its own folder
    stem = "precondition" if name in grids else f"precondition_{name}"
    dsr, alignment = {}, {}
    for beta in betas:
        for kind in PROMPT_KINDS:
            dsr[(beta, kind)] = run_cell(compose(cells[(beta, kind)]))["cell"]
        alignment[beta] = direction_alignment(compose(probes[beta]))
        progress(
            f"precondition beta={beta}: DSR explicit {dsr[(beta, 'explicit')]['dsr']:.3f} synonym "
            f"{dsr[(beta, 'synonym')]['dsr']:.3f} indirect {dsr[(beta, 'indirect')]['dsr']:.3f}; "
            f"cos(words, C*) {alignment[beta]['cos_mean']:.3f}"
        )
    table = precondition_table(dsr, alignment)
    folder = Path(out) / grids.get(name, "toy")
    atomic_write_text(folder / f"{stem}.md", to_markdown(table))
    atomic_write_text(folder / f"{stem}.csv", table.to_csv(index=False, float_format="%.4f"))
    return table


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    extra = list(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        chosen = any(a.startswith("+experiment=") for a in extra)  # e.g. +experiment=toy_duo_words
        table = run(extra if chosen else ["+experiment=toy_duo", *extra])
        print("\n" + to_markdown(table))
        return 0

    return exit_status(body)


if __name__ == "__main__":
    sys.exit(main())
