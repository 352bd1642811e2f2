"""What a cell writes: one row per image and one per cell (``evaluation/records.py`` holds their
columns), the results index, the collapse flag, and the lookup of an already recorded result."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from filelock import FileLock
from omegaconf import DictConfig

from unlearn_exp.atomic import atomic_write_text
from unlearn_exp.cell.samples import chunk_meta, safe_name
from unlearn_exp.hashing import file_sha256
from unlearn_exp.hashing import to_plain as plain
from unlearn_exp.identity import cell_spec, spec_key
from unlearn_exp.settings import method_hook

if TYPE_CHECKING:  # the stage dataclasses, for annotations only
    from unlearn_exp.cell.stages import Cell, ConceptGuidance, Judged, Originals, Samples, Scores, Unlearned

log = logging.getLogger("unlearn_exp")


def checkpoint_label(cfg) -> tuple[float, str]:
    """A cell's checkpoint as the tables name it: (beta, label). A checkpoint loaded from
    ``checkpoint.path`` carries the beta the user gave explicitly (``checkpoint.beta_label``, set by
    the command line when ``checkpoint.beta`` is on it), else none: it is labelled by its file."""
    ck = cfg.checkpoint
    beta = ck.get("beta")
    if ck.get("path"):
        paths = ck.path if not isinstance(ck.path, str) else [ck.path]
        label = "+".join(Path(str(p)).name for p in paths)
        explicit = ck.get("beta_label")
        if explicit is None:
            return float("nan"), label
        return float(explicit), f"{label} (beta={float(explicit):g})"
    if beta is None:  # a method without beta: its name, or its own label (ESD: its variant)
        label_of = method_hook("checkpoint", ck.method, "label")
        return float("nan"), str(label_of(ck) if label_of is not None else ck.method)
    return float(beta), f"{ck.method} beta={float(beta):g}"


def collapse_flag(pp_cfg, benign_acc: float, pp_values: dict[str, float]) -> str:
    """Why a cell's benign fidelity counts as collapsed (``pp.benign_acc_floor``, ``pp.pp_floor`` on
    the benign PP prompts), or "" (docs/design.md 2: a "safe" verdict on a broken image is not a defence)."""
    reasons = []
    floor = pp_cfg["benign_acc_floor"]
    if floor is not None and benign_acc == benign_acc and benign_acc < float(floor):
        reasons.append(f"benign acc {benign_acc:.3f} < {float(floor):g}")
    floor = pp_cfg["pp_floor"]
    for name, value in pp_values.items():  # benign prompts only: PP on the benchmark is meant to drop
        if name != "bench" and floor is not None and value == value and value < float(floor):
            reasons.append(f"PP {name} {value:.3f} < {float(floor):g}")
    return "; ".join(reasons)


def image_records(
    cell: Cell,
    made: Originals,
    samples: Samples,
    judged: Judged,
    scores: Scores,
    cell_key: str,
    judge_profile: dict,
    pp_profile: dict,
) -> list[dict[str, Any]]:
    """One row per image (benchmark and PP sets): prompt, seed, files, verdict, PP distance."""
    cfg = cell.cfg
    common = {
        "cell_key": cell_key,
        "guidance_scale": float(cfg.sampling.guidance_scale),
        "pp_profile": pp_profile["name"],
        "pp_hash": pp_profile["hash"],
    }
    splits = {"bench": samples.chunks["bench"], **{k: samples.chunks[k] for k in made.refs if k != "bench"}}
    image_rows = []
    for split, chunk_list in splits.items():
        rows = cell.bench if split == "bench" else cell.pp_sets[split]
        metas = [(c, m) for c in chunk_list for m in chunk_meta(c)]
        ref_files = [
            str((c.folder / m["file"]).resolve()) for c in made.refs.get(split, []) for m in chunk_meta(c)
        ]
        lpips = scores.lpips_by_split.get(split, [float("nan")] * len(rows))
        split_verdicts = (
            judged.verdicts if split == "bench" else judged.pp_verdicts.get(split, [{}] * len(rows))
        )
        oks = judged.benign_ok.get(split, [None] * len(rows))
        for i, r in enumerate(rows):
            v = split_verdicts[i]
            chunk, meta = metas[i]
            path = chunk.folder / meta["file"]
            image_rows.append(
                {
                    **common,
                    "split": split,
                    "benchmark": cell.bench_attrs.get("benchmark")
                    if split == "bench"
                    else cfg.pp.prompts.name,
                    "case_id": str(r["case_id"]),
                    "source_row": int(r.get("source_row", i)),
                    "prompt": r["prompt"],
                    "empty_prompt": not str(r["prompt"]).strip(),
                    "truncated": bool(meta.get("truncated", False)),
                    "n_tokens": int(meta["n_tokens"]) if meta.get("n_tokens") is not None else None,
                    "seed": int(r["seed"]),
                    "image_index": int(r["image_index"]),
                    "image_path": str(path.resolve()),
                    "reference_path": ref_files[i] if i < len(ref_files) else None,
                    "image_sha256": file_sha256(path),
                    "judge_profile": judge_profile["name"] if v else None,
                    "judge_hash": judge_profile["hash"] if v else None,
                    "safe": v.get("safe"),
                    "score": v.get("score"),
                    "judge_raw": v.get("raw"),
                    "lpips": lpips[i],
                    "benign_ok": oks[i],
                }
            )
    return image_rows


def cell_record(
    cell: Cell,
    ck: Unlearned,
    conc: ConceptGuidance,
    samples: Samples,
    scores: Scores,
    image_rows: list[dict[str, Any]],
    cell_key: str,
    judge_profile: dict,
    pp_profile: dict,
) -> dict[str, Any]:
    """The cell's one row: identity (``spec_key``, ``cell_key``), DSR, PP, counts, notes, config."""
    cfg, stats, spec = cell.cfg, scores.stats, cell.spec
    bench_images = [r for r in image_rows if r["split"] == "bench"]
    bench_meta = [m for c in samples.chunks["bench"] for m in chunk_meta(c)]
    # a guidance with two modes (SAFREE: fixed or official) says which it ran in its description
    safree_compat = str(conc.guidance.describe().get("compat") or "")
    beta, label = checkpoint_label(cfg)
    guided = cfg.guidance.name != "none"
    return {
        "cell_key": cell_key,
        "spec_key": spec_key(spec),
        "experiment": str(cfg.name),
        "task": str(cfg.task.name),
        "scale": str(cfg.model.name),
        "model_id": cell.model_id,
        "checkpoint_method": str(cfg.checkpoint.method),
        "beta": beta,
        "checkpoint_label": label,
        "checkpoint_id": ck.checkpoint_id,
        "guidance": str(cfg.guidance.name),
        "embedding": str(cfg.embedding.source) if guided else "none",
        "embedding_id": conc.concept.identity if guided else "",
        "benchmark": cell.bench_attrs.get("benchmark", cfg.benchmark.name),
        "benchmark_sha256": cell.bench_attrs.get("file_sha256", ""),
        "dsr": stats["dsr"],
        "dsr_lo": stats["lo"],
        "dsr_hi": stats["hi"],
        "n_images": stats["n"],
        "n_safe": stats["n_safe"],
        "n_truncated": sum(bool(r["truncated"]) for r in bench_images),
        "n_empty_prompts": sum(bool(r["empty_prompt"]) for r in bench_images),
        "safree_compat": safree_compat,
        # prompts the two SAFREE modes condition differently (guidance/safree.py compat_differs)
        "n_safree_compat_differs": sum(bool(m.get("safree_compat_differs")) for m in bench_meta)
        if safree_compat
        else 0,
        "pp_coco": scores.pp_values.get("coco", float("nan")),
        "pp_bench": scores.pp_values.get("bench", float("nan")),
        "n_pp_coco": len(scores.lpips_by_split.get("coco", [])),
        "n_pp_bench": len(scores.lpips_by_split.get("bench", [])),
        "benign_acc": scores.benign_acc,
        "n_benign": scores.n_benign,
        "flag": collapse_flag(cfg.pp, scores.benign_acc, scores.pp_values),
        "judge_profile": judge_profile["name"],
        "judge_hash": judge_profile["hash"],
        "pp_profile": pp_profile["name"],
        "pp_hash": pp_profile["hash"],
        "spec_json": spec,
        "config_json": {k: plain(cfg[k]) for k in cfg if k != "hydra"},
        "created_at": pd.Timestamp.now(tz="UTC").isoformat(),
    }


def copy_images(image_rows: list[dict[str, Any]], folder: Path) -> None:
    """The job's images in its run directory, named ``<split>/<case id>_<image index>.png``: copies,
    so that nothing done to them can change the artifact cache."""
    for r in image_rows:
        dest = folder / r["split"] / f"{safe_name(r['case_id'])}_{r['image_index']}.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(r["image_path"], tmp)
        tmp.replace(dest)


INDEX_COLUMNS = (
    "cell",
    "cell_key",
    "spec_key",
    "checkpoint_label",
    "guidance",
    "embedding",
    "benchmark",
    "n_images",
    "dsr",
    "created_at",
)


def _index_row(cell: dict[str, Any]) -> dict[str, Any]:
    name = f"{cell['checkpoint_label']} | {cell['guidance']}" + (
        f"+{cell['embedding']}" if cell["embedding"] not in ("none", "explicit") else ""
    )
    return {"cell": name, **{k: cell.get(k) for k in INDEX_COLUMNS if k != "cell"}}


def index_rows(folder: Path) -> list[dict[str, Any]]:
    """The rows of ``<folder>/index.csv``; an index that cannot be read (garbled, not UTF-8, missing
    columns) is rebuilt from the cell folders beside it (one log line), never a reason to fail."""
    index = folder / "index.csv"
    if not index.is_file():
        return []
    try:
        table = pd.read_csv(index, dtype=str)
        if "cell_key" in table.columns and "spec_key" in table.columns:
            return table.to_dict("records")
        problem = "it lacks the cell_key and spec_key columns"
    except (UnicodeDecodeError, ValueError, pd.errors.ParserError) as e:
        problem = str(e).splitlines()[0]
    rows = []
    for cells in sorted(folder.glob("*/cells.parquet")):
        try:
            rows.append(_index_row(pd.read_parquet(cells).iloc[0].to_dict()))
        except Exception:  # an unreadable cell folder is not listed; its cell is computed again
            continue
    log.warning("%s cannot be read (%s): rebuilt from its %d cell folder(s)", index, problem, len(rows))
    return [{k: None if v is None else str(v) for k, v in r.items()} for r in rows]


def update_index(folder: Path, cell: dict[str, Any]) -> Path:
    """``<results>/<experiment>/index.csv``: one readable line per cell folder (its name, what it is,
    its DSR), rewritten atomically under a lock so parallel jobs keep every line."""
    index = folder / "index.csv"
    row = _index_row(cell)
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(index) + ".lock"):
        rows = index_rows(folder)
        rows = [r for r in rows if r.get("cell_key") != cell["cell_key"]] + [row]
        atomic_write_text(index, pd.DataFrame(rows, columns=list(INDEX_COLUMNS)).to_csv(index=False))
    return index


def quarantine_result(results: Path, problems: list[str]) -> Path:
    """Move a results folder whose rows contradict themselves to ``<experiment>/quarantine/`` (one
    log line names it and why), so the cell is computed again and nothing reads the old numbers."""
    target = results.parent / "quarantine" / f"{results.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(results, target)
    except FileNotFoundError:  # a parallel job of the same cell moved it first
        return target
    log.warning(
        "recorded cell %s contradicts itself (%s): moved to %s", results.name, "; ".join(problems), target
    )
    return target


def recorded_result(cfg: DictConfig, spec: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The result already recorded for exactly this cell (``reuse_results``): the row under
    ``<results>/<experiment>/`` whose ``spec_key`` is this config's, with the same checkpoint label,
    and both tables present. Nothing is loaded. None where there is none, or where the model's
    weights are not here (its content cannot be checked)."""
    from unlearn_exp.evaluation.records import read_table, row_problems

    spec = spec if spec is not None else cell_spec(cfg)
    if spec["model"]["content"] is None:
        return None
    key, label = spec_key(spec), checkpoint_label(cfg)[1]
    folder = Path(cfg.paths.results_dir) / str(cfg.name)
    if not (folder / "index.csv").is_file():
        return None
    for cell_key in [r["cell_key"] for r in index_rows(folder) if r.get("spec_key") == key]:
        results = folder / str(cell_key)
        if not ((results / "cells.parquet").is_file() and (results / "images.parquet").is_file()):
            continue
        try:
            row = read_table(results / "cells.parquet").iloc[0].to_dict()
            problems = row_problems(row, read_table(results / "images.parquet"))
        except Exception:  # an unreadable table is not a result: compute the cell again
            continue
        if problems:  # a row that contradicts itself is not a result either: set aside, recomputed
            quarantine_result(results, problems)
            continue
        if row.get("spec_key") == key and row.get("checkpoint_label") == label:
            log.info(
                "cell %s: already recorded (same spec_key %s), DSR %.3f; results %s",
                cell_key,
                key,
                row["dsr"],
                results,
            )
            return {
                "cell": row,
                "results": str(results),
                "artifacts": {"built": [], "reused": []},
                "reused_result": True,
                "timings": {},
            }
    return None
