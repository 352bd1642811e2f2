"""``stage=attack``: UnlearnDiffAtk against one grid cell (docs/methods.md 12.2), and its success rate.

For the cell's model, unlearned checkpoint and guidance (with the words or ``C*``), the targets are the
first ``attack.n_targets`` benchmark prompts whose image by the *original* model the evaluation judge
flags (the harmful image the unlearning was meant to remove). For each target the attack optimises
``attack.k`` tokens prepended to its prompt against the unlearned model with the guidance in the loop
(``attacks/unlearndiffatk.py``), then samples the adversarial prompt with the cell's model and
guidance at the row's seed and judges the image. The attack success rate (ASR) is the share of
targets whose adversarial image is judged unsafe (Wilson 95% interval); ``unsafe_before`` is the
share whose own prompt is already unsafe under the cell, without the attack.

Every step goes through the artifact store (the original model's images, the attack per target, the
adversarial images, the verdicts), so a killed job resumes. The result is one JSON per cell and
attack setting under ``<results_dir>/<name>/attacks/`` (keyed by the cell's ``spec_key``, which the
report joins on) and the adversarial prompts as a CSV in the benchmark schema, usable as
``benchmark=prompts_file benchmark.path=...``. With ``logger=wandb`` the result is also logged as its
own run (``attack-<spec_key>-<attack_key>``, job type ``attack``): ASR, its interval and a table of
the targets.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from omegaconf import DictConfig

from unlearn_exp import progress
from unlearn_exp.atomic import atomic_write_json, atomic_write_text
from unlearn_exp.attacks.config import UnlearnDiffAtkConfig
from unlearn_exp.errors import UserError
from unlearn_exp.evaluation.dsr import dsr
from unlearn_exp.hashing import config_hash, to_plain
from unlearn_exp.identity import cell_spec, spec_key
from unlearn_exp.validate import validate

if TYPE_CHECKING:
    from unlearn_exp.attacks.unlearndiffatk import AttackSettings
    from unlearn_exp.cell import Cell, Chunk, ConceptGuidance, Originals

log = logging.getLogger("unlearn_exp")


def attack_key(cfg) -> str:
    """The attack's settings by content (its part of a result's identity)."""
    return config_hash(
        {
            "attack": to_plain(cfg.attack),
            "steps": int(cfg.sampling.steps),
            "guidance_scale": float(cfg.sampling.guidance_scale),
        }
    )


def run_attack_cell(cfg: DictConfig) -> dict[str, Any]:
    """Run ``stage=attack`` for the cell ``cfg`` describes; returns the recorded result. Its W&B run
    (with ``logger=wandb``) is open throughout, so training curves of stages it builds attach to it."""
    from unlearn_exp.tracking import Tracker, run_name

    validate(cfg)
    from unlearn_exp.assets import require

    require(cfg)
    spec = cell_spec(cfg)
    run_id = f"attack-{spec_key(spec)}-{attack_key(cfg)}"
    name = f"attack/{run_name(cfg)}"
    with Tracker.from_cfg(cfg).start(cfg, tags=["stage=attack"], run_id=run_id, name=name) as tracker:
        return _attack_cell(cfg, tracker, spec)  # the run finishes with exit code 1 on an exception


def _attack_cell(cfg: DictConfig, tracker, spec: dict[str, Any]) -> dict[str, Any]:
    """The attack on the cell's stages: targets, checkpoint, concept, attacks, verdicts, record."""
    from unlearn_exp.attacks.unlearndiffatk import AttackSettings
    from unlearn_exp.cell import concept, open_cell, unlearn

    progress.configure(cfg.progress)
    settings = AttackSettings.from_cfg(
        cfg.attack, guidance_scale=float(cfg.sampling.guidance_scale), num_steps=int(cfg.sampling.steps)
    )
    n = UnlearnDiffAtkConfig.from_cfg(cfg.attack).n_targets  # >= 1, or None: every flagged prompt
    cell = open_cell(cfg, spec=spec)
    if not cell.bench:
        raise UserError(f"benchmark '{cfg.benchmark.name}' has no prompts to attack")
    found = _find_targets(cell, n)  # before unlearning: the original model's images, judged
    made = _originals(cell)
    ck = unlearn(cell)  # the cell: unlearned checkpoint, concept and guidance
    conc = concept(cell, made, ck)
    results = _attack_targets(cell, conc, found, settings)
    judged = _judge_attacks(cell, conc, found, results)
    return _write_result(cell, _attack_record(cell, found, judged), tracker)


@dataclass
class _Targets:
    """The original model's benchmark images, the ones the judge flags, and the first n: the targets."""

    refs: list[Chunk]
    images: list[Any]  # every image of ``refs``, in row order
    flagged: list[int]
    indices: list[int]
    rows: list[dict[str, Any]]  # the targets' benchmark rows


@dataclass
class _Attacked:
    """Per target: the attack's result, the verdicts on its adversarial and on its own prompt's image."""

    results: list[dict[str, Any]]
    adv_verdicts: list[dict[str, Any]]
    own_verdicts: list[dict[str, Any]]


def _find_targets(cell: Cell, n: int | None) -> _Targets:
    """The original model's benchmark images, judged; the first ``n`` flagged are the targets."""
    from unlearn_exp.cell import ORIGINAL, chunk_images, generate_samples, judge_chunks
    from unlearn_exp.guidance.base import Guidance

    original = {"model": cell.model_id, **ORIGINAL}
    refs = generate_samples(
        cell.comps,
        Guidance(),
        cell.bench,
        original,
        cell.store,
        cell.cfg,
        f"original model: {cell.set_name['bench']} (attack targets)",
    )
    verdicts = judge_chunks(refs, cell.judge, cell.store, f"{cell.set_name['bench']} (original model)")
    images = [img for chunk in refs for img in chunk_images(chunk)]
    flagged = [i for i, v in enumerate(verdicts) if not v["safe"]]
    targets = flagged if n is None else flagged[: int(n)]
    if not targets:
        raise UserError(
            f"the judge flags none of the original model's {len(verdicts)} images of "
            f"'{cell.cfg.benchmark.name}': nothing to attack"
        )
    return _Targets(refs, images, flagged, targets, [dict(cell.bench[i]) for i in targets])


def _originals(cell: Cell) -> Originals:
    """Stage 0 as the attack needs it: only the harmful images ``C*`` is learned from, if any."""
    from unlearn_exp.cell import Originals, image_set_ref, needs_learned_concept, original_model

    cfg = cell.cfg
    needs_images = needs_learned_concept(cfg) and not cfg.embedding.get("path")
    image_set = (
        image_set_ref(cfg, functools.partial(original_model, cell), cell.store, cell.model_id)
        if needs_images
        else None
    )
    return Originals({}, image_set)


def _attack_targets(
    cell: Cell, conc: ConceptGuidance, found: _Targets, settings: AttackSettings
) -> list[dict[str, Any]]:
    """The attack on every target, against the unlearned model with the guidance in the loop."""
    from unlearn_exp.attacks.unlearndiffatk import attack
    from unlearn_exp.evaluation.images import to_tensor

    results = []
    for i, row in zip(found.indices, found.rows):
        key = {**conc.identity, "target": _image_key(found.refs, i)}
        out = attack(
            cell.comps,
            cell.store,
            key,
            to_tensor([found.images[i]]),
            str(row["prompt"]),
            settings,
            conc.guidance,
        )
        results.append(out)
    return results


def _judge_attacks(
    cell: Cell, conc: ConceptGuidance, found: _Targets, results: list[dict[str, Any]]
) -> _Attacked:
    """The cell's images of the adversarial prompts and of the targets' own prompts, judged."""
    from unlearn_exp.cell import generate_samples, judge_chunks

    adv_rows = [{**row, "prompt": r["prompt"]} for row, r in zip(found.rows, results)]
    attacked = {**conc.identity, "attack": attack_key(cell.cfg)}
    adv = generate_samples(
        cell.comps,
        conc.guidance,
        adv_rows,
        attacked,
        cell.store,
        cell.cfg,
        f"sampling adversarial prompts x {conc.what}",
    )
    adv_verdicts = judge_chunks(adv, cell.judge, cell.store, "adversarial prompts")
    own = generate_samples(
        cell.comps,
        conc.guidance,
        found.rows,
        conc.identity,
        cell.store,
        cell.cfg,
        f"sampling the targets' prompts x {conc.what}",
    )
    own_verdicts = judge_chunks(own, cell.judge, cell.store, "targets' own prompts")
    return _Attacked(results, adv_verdicts, own_verdicts)


def _attack_record(cell: Cell, found: _Targets, judged: _Attacked) -> dict[str, Any]:
    """The result: ASR with its interval, ``unsafe_before``, and every target's prompts and losses."""
    cfg = cell.cfg
    stats = dsr([v["safe"] for v in judged.adv_verdicts])  # the share judged safe: ASR = 1 - DSR
    own_verdicts = judged.own_verdicts
    return {
        "spec_key": spec_key(cell.spec),
        "created_at": datetime.now(UTC).isoformat(),
        "attack": str(cfg.attack.name),
        "attack_key": attack_key(cfg),
        "attack_settings": to_plain(cfg.attack),
        "model": cell.model_id,
        "checkpoint": f"{cfg.checkpoint.method} beta={cfg.checkpoint.beta}",
        "guidance": str(cfg.guidance.name),
        "embedding": str(cfg.embedding.source),
        "benchmark": str(cfg.benchmark.name),
        "n_flagged": len(found.flagged),
        "n_targets": len(found.indices),
        "asr": 1.0 - stats["dsr"],
        "asr_lo": 1.0 - stats["hi"],
        "asr_hi": 1.0 - stats["lo"],
        "unsafe_before": sum(not v["safe"] for v in own_verdicts) / len(own_verdicts),
        "targets": [
            {
                "case_id": r.get("case_id"),
                "seed": int(r["seed"]),
                "prompt": str(r["prompt"]),
                "adversarial_prompt": res["prompt"],
                "loss": res["loss"],
                "first_loss": res["first_loss"],
                "unsafe_before": not ov["safe"],
                "unsafe_after": not av["safe"],
            }
            for r, res, ov, av in zip(found.rows, judged.results, own_verdicts, judged.adv_verdicts)
        ],
    }


def _write_result(cell: Cell, record: dict[str, Any], tracker) -> dict[str, Any]:
    """The record (JSON) and the adversarial prompts (CSV) written, then tracked, then logged."""
    cfg = cell.cfg
    folder = Path(cfg.paths.results_dir) / str(cfg.name) / "attacks"
    stem = f"{record['spec_key']}-{record['attack_key']}"
    csv = pd.DataFrame(
        [
            {"prompt": t["adversarial_prompt"], "seed": t["seed"], "case_id": t["case_id"]}
            for t in record["targets"]
        ]
    ).to_csv(index=False)
    atomic_write_text(folder / f"{stem}.csv", csv)
    atomic_write_json(folder / f"{stem}.json", {**record, "prompts_csv": str(folder / f"{stem}.csv")})
    tracker.log_attack(record)  # written first, then tracked (as a cell)
    log.info(
        "attack %s on %s x %s (%s): ASR %.3f [%.3f, %.3f] over %d targets (unsafe before: %.3f); %s",
        record["attack"],
        record["checkpoint"],
        record["guidance"],
        record["embedding"],
        record["asr"],
        record["asr_lo"],
        record["asr_hi"],
        record["n_targets"],
        record["unsafe_before"],
        folder / f"{stem}.json",
    )
    return {**record, "results": str(folder / f"{stem}.json")}


def _image_key(refs, index: int) -> str:
    """A target by content: the original-model chunk's key and the row's place in it."""
    offset = 0
    for chunk in refs:
        if index < offset + len(chunk.rows):
            return f"{config_hash(chunk.key)}:{index - offset}"
        offset += len(chunk.rows)
    raise IndexError(index)


def load_attacks(paths) -> pd.DataFrame:
    """Every recorded attack result under ``paths`` (``*/attacks/*.json``), one row each, oldest first
    (by ``created_at``); of one cell attacked twice with the same settings the newer is kept."""
    recs = []
    for root in paths:
        for f in sorted(Path(root).rglob("attacks/*.json")):
            try:
                rec = json.loads(f.read_text())
            except (OSError, ValueError) as e:
                raise UserError(f"cannot read the attack result '{f}': {e}") from e
            if "spec_key" in rec and "asr" in rec:
                keys = (
                    "spec_key",
                    "attack",
                    "attack_key",
                    "asr",
                    "asr_lo",
                    "asr_hi",
                    "n_targets",
                    "unsafe_before",
                )
                recs.append({**{k: rec[k] for k in keys}, "created_at": rec.get("created_at", "")})
    if not recs:
        return pd.DataFrame(columns=["spec_key", "attack", "attack_key", "asr", "asr_lo", "asr_hi"])
    frame = pd.DataFrame(recs).sort_values("created_at", kind="stable")
    return frame.drop_duplicates(["spec_key", "attack_key"], keep="last").reset_index(drop=True)
