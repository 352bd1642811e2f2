"""One grid cell, as named stages over the artifact store. ``run_cell`` validates the config, returns
an already recorded result where there is one, and otherwise runs ``run_stages``:

``open_cell`` (config, model, prompt sets, judge) -> ``originals`` (what the original model makes:
PP references, C*'s images) -> ``unlearn`` -> ``concept`` (the words or ``C*``, and the guidance)
-> ``sample`` -> ``judge`` -> ``score`` -> ``record`` (image and cell rows, written atomically).

Each stage takes and returns the small dataclasses below. ``toy/artifacts.py``, ``precondition.py``
and ``attack.py`` run stages 0-2 through the same functions, so their keys are the cell's. The
stages' helpers live beside this file: ``keys`` (identity keys), ``inputs`` (model, store, prompt
rows), ``samples`` (chunks, verdicts, distances), ``concept_source`` (the words or ``C*``) and
``records`` (the rows written).

A killed sweep resumes from the last finished chunk; a repeated sweep recomputes nothing. Results
(one row per image, one per cell) are written to disk before anything is sent to the tracker.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from omegaconf import DictConfig

from unlearn_exp import progress
from unlearn_exp.atomic import atomic_dir, atomic_write_json
from unlearn_exp.cell.concept_source import image_set_ref, resolve_concept
from unlearn_exp.cell.inputs import apply_unlearning, benchmark_rows, cell_store, convert_pickles, load_model
from unlearn_exp.cell.keys import ORIGINAL, cell_key, sample_identity
from unlearn_exp.cell.records import (
    cell_record,
    copy_images,
    image_records,
    recorded_result,
    update_index,
)
from unlearn_exp.cell.samples import (
    benign_fidelity,
    chunk_images,
    generate_samples,
    judge_chunks,
    pp_distances,
)
from unlearn_exp.cell.stages import Cell, ConceptGuidance, Judged, Originals, Samples, Scores, Unlearned
from unlearn_exp.errors import NotImplementedStage, UserError
from unlearn_exp.evaluation.dsr import dsr
from unlearn_exp.families import required_parts
from unlearn_exp.hashing import config_hash
from unlearn_exp.hashing import to_plain as plain
from unlearn_exp.identity import cell_spec
from unlearn_exp.paths import job_dir, resolve_local_path
from unlearn_exp.registry import UNLEARNING
from unlearn_exp.validate import validate

if TYPE_CHECKING:
    from unlearn_exp.models import Components

log = logging.getLogger("unlearn_exp")


def run_cell(cfg: DictConfig) -> dict[str, Any]:
    from unlearn_exp.tracking import Tracker

    validate(cfg)  # every value checked before any model is loaded or any folder written
    from unlearn_exp.assets import require

    require(cfg)  # every external file the cell reads, named at once

    progress.configure(cfg.get("progress", "auto"))
    spec = cell_spec(cfg)  # once: for the recorded result and for the cell's own row
    if cfg.get("reuse_results"):
        done = recorded_result(cfg, spec)
        if done is not None:
            return done
    tracker = Tracker.from_cfg(cfg)
    tracker.start(cfg)
    exit_code = 1
    try:
        result = run_stages(cfg, tracker, spec)
        exit_code = 0
        return result
    finally:
        tracker.finish(exit_code=exit_code)


def run_stages(cfg: DictConfig, tracker, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """The named stages in order; each reads and writes the store, so any of them resumes."""
    started = time.time()
    timings: dict[str, float] = {}

    def timed(stage: str, fn, *args):
        t = time.time()
        out = fn(*args)
        timings[stage] = time.time() - t
        return out

    cell = timed("load", lambda: open_cell(cfg, spec=spec))
    made = timed("originals", originals, cell)
    ck = timed("unlearn", unlearn, cell)
    conc = timed("concept", concept, cell, made, ck)
    samples = timed("sample", sample, cell, conc)
    judged = timed("judge", judge, cell, samples)
    scores = timed("score", score, cell, made, samples, judged)
    result = timed("record", record, cell, made, ck, conc, samples, judged, scores, tracker)
    result["timings"] = timings
    row = result["cell"]
    log.info(
        "cell %s: DSR %.3f [%.3f, %.3f] on %d images, PP coco %.3f bench %.3f "
        "(%.0f s; built %d, reused %d); results %s",
        row["cell_key"],
        row["dsr"],
        row["dsr_lo"],
        row["dsr_hi"],
        row["n_images"],
        row["pp_coco"],
        row["pp_bench"],
        time.time() - started,
        len(cell.store.built),
        len(cell.store.reused),
        result["results"],
    )
    return result


def open_cell(cfg: DictConfig, *, prompts: bool = True, spec: dict[str, Any] | None = None) -> Cell:
    """Load the model and (unless ``prompts`` is false) the benchmark and PP prompt sets."""
    if cfg.checkpoint.method not in UNLEARNING.names() and not cfg.checkpoint.get("_target_"):
        raise NotImplementedStage(f"unlearning ({cfg.checkpoint.method})")

    store = cell_store(cfg)
    out_dir = job_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.model.get("source") == "pretrained":  # missing weights stop the job before any work
        from unlearn_exp.models.pretrained import resolve_checkpoint

        parts = required_parts(plain(cfg.model))  # the model family's subfolders
        resolve_checkpoint(resolve_local_path(str(cfg.model.path)), parts=parts)
    # identity, judge and PP metric before any work: a missing file stops the job here
    from unlearn_exp.evaluation.judge import make_judge
    from unlearn_exp.evaluation.pp import make_pp_metric

    spec = spec if spec is not None else cell_spec(cfg)
    the_judge, metric = make_judge(cfg.judge), make_pp_metric(cfg.pp.metric)
    bench, bench_attrs, pp_sets = [], {}, {}
    if prompts:
        bench, bench_attrs = benchmark_rows(cfg.benchmark, cfg.paths.data_dir)
        if cfg.pp.get("prompts") is not None:
            pp_sets["coco"] = benchmark_rows(cfg.pp.prompts, cfg.paths.data_dir, "pp.prompts")[0]
        if cfg.pp.bench:
            pp_sets["bench"] = bench
    convert_pickles(cfg.checkpoint, store)  # a pickle holding code is refused before the model loads
    comps = load_model(cfg.model)
    log.info("model %s (%s)", comps.identity, comps.source)
    from unlearn_exp.sampling import apply_gpu_options

    apply_gpu_options(comps, cfg.sampling)
    set_name = {
        "bench": str(cfg.benchmark.name),
        "coco": str(cfg.pp.prompts.name) if "coco" in pp_sets else "",
    }
    return Cell(
        cfg,
        store,
        comps,
        comps.identity,
        out_dir,
        bench,
        bench_attrs,
        pp_sets,
        set_name,
        spec,
        the_judge,
        metric,
    )


def needs_learned_concept(cfg) -> bool:
    return cfg.guidance.name != "none" and cfg.embedding.source != "explicit"


def original_model(cell: Cell) -> Components:
    """The original model: the cell's own before stage 1, else a fresh copy (with the sampling GPU
    options), for what must be made by the original model after the checkpoint is applied."""
    if not cell.unlearned:
        return cell.comps
    from unlearn_exp.sampling import apply_gpu_options

    comps = load_model(cell.cfg.model)
    apply_gpu_options(comps, cell.cfg.sampling)
    return comps


def originals(cell: Cell) -> Originals:
    """Stage 0 (before the model is unlearned): the original model's images of every PP prompt set,
    and the harmful images ``C*`` is learned from, where the cell learns one."""
    from unlearn_exp.guidance.base import Guidance

    cfg = cell.cfg
    original = {"model": cell.model_id, **ORIGINAL}
    refs = {
        name: generate_samples(
            cell.comps, Guidance(), rows, original, cell.store, cfg, f"original model: {cell.set_name[name]}"
        )
        for name, rows in cell.pp_sets.items()
    }
    needs_images = needs_learned_concept(cfg) and not cfg.embedding.get("path")
    loader = functools.partial(original_model, cell)  # called only if the set must be generated
    image_set = image_set_ref(cfg, loader, cell.store, cell.model_id) if needs_images else None
    return Originals(refs, image_set)


def unlearn(cell: Cell) -> Unlearned:
    """Stage 1: train (or reuse, or load) the unlearned checkpoint and apply it to the model."""
    ck = apply_unlearning(cell.cfg, cell.comps, cell.store, cell.cfg.checkpoint, cell.loggers("unlearning"))
    check_checkpoint_content(cell.cfg.checkpoint, cell.spec, ck)
    cell.unlearned = True
    return Unlearned(str(ck.get("id", ck.get("hash", config_hash(plain(cell.cfg.checkpoint))))), ck)


def check_checkpoint_content(checkpoint, spec: dict[str, Any], info: dict[str, Any]) -> None:
    """The files the cell's spec names by content are the files that were loaded: a user's checkpoint
    file whose sha256 in the spec (``identity.cell_spec``) differs from the loaded bits would record a
    row whose spec and ``checkpoint_id`` disagree, so it is one ``UserError``."""
    given = checkpoint.get("path")
    given = [given] if isinstance(given, str) else list(given or [])
    named = (spec.get("checkpoint") or {}).get("files") or []
    loaded, shas = info.get("files") or [], info.get("sha256") or []
    if not (len(given) == len(named) == len(loaded) == len(shas)):
        return  # a folder or a converted file: named by other means
    for path, ident, file, sha in zip(given, named, loaded, shas):
        same_file = Path(resolve_local_path(str(path))).resolve() == Path(file).resolve()
        if same_file and str(ident).startswith("sha256:") and ident != f"sha256:{sha}":
            raise UserError(
                f"checkpoint file '{file}' changed while the cell was set up: its identity says "
                f"{str(ident)[7:23]}, the loaded bits are {sha[:16]}; run the cell again"
            )


def concept(cell: Cell, made: Originals, ck: Unlearned) -> ConceptGuidance:
    """Stage 2: the concept (the words, or ``C*`` learned on the checkpoint or the shared source) and
    the guidance method built on it."""
    from unlearn_exp.guidance.factory import make_guidance

    cfg = cell.cfg
    conc = resolve_concept(
        cfg, cell.comps, cell.store, cell.model_id, made.image_set, cell.loggers, ck.checkpoint_id
    )
    step_scale = 1.0
    if cfg.sampling.scale_step_counts:  # presets count steps of a 50-step sampler
        step_scale = int(cfg.sampling.steps) / int(cfg.sampling.reference_steps)
    guidance = make_guidance(cfg.guidance, cfg.task, conc, step_scale=step_scale)
    identity = {"model": cell.model_id, "checkpoint": ck.checkpoint_id, "guidance": guidance.describe()}
    if cfg.guidance.name != "none":
        identity["concept"] = conc.identity
    if ck.checkpoint_id == "original" and cfg.guidance.name == "none":
        identity = {"model": cell.model_id, **ORIGINAL}
    what = f"{cfg.checkpoint.method} x {cfg.guidance.name}" + ("+C*" if conc.learned else "")
    return ConceptGuidance(conc, guidance, identity, what)


def sample(cell: Cell, conc: ConceptGuidance) -> Samples:
    """Stage 3: the guided images of the benchmark and of every other PP prompt set."""
    rows = {"bench": cell.bench, **{k: v for k, v in cell.pp_sets.items() if k != "bench"}}
    chunks = {
        name: generate_samples(
            cell.comps,
            conc.guidance,
            r,
            conc.identity,
            cell.store,
            cell.cfg,
            f"sampling {cell.set_name[name]} x {conc.what}",
        )
        for name, r in rows.items()
    }
    return Samples(chunks)


def judge(cell: Cell, samples: Samples) -> Judged:
    """Stage 4: the evaluation judge on every image (benchmark and PP sets)."""
    verdicts = judge_chunks(samples.chunks["bench"], cell.judge, cell.store, cell.set_name["bench"])
    split_chunks = {name: samples.chunks[name] for name in ["bench", *cell.pp_sets] if name in samples.chunks}
    pp_verdicts, benign_ok = benign_fidelity(
        split_chunks, cell.pp_sets, cell.judge, cell.store, cell.set_name
    )
    return Judged(verdicts, pp_verdicts, benign_ok)


def score(cell: Cell, made: Originals, samples: Samples, judged: Judged) -> Scores:
    """Stage 5: DSR (Wilson interval), PP against the original model's images, benign accuracy."""
    from unlearn_exp.evaluation.pp import pp

    pp_values, lpips_by_split = {}, {}
    for name, ref in made.refs.items():
        d = pp_distances(samples.chunks[name], ref, cell.metric, cell.store, cell.set_name[name])
        pp_values[name], lpips_by_split[name] = pp(d), d
    benign = [ok for oks in judged.benign_ok.values() for ok in oks]
    benign_acc = sum(benign) / len(benign) if benign else float("nan")
    return Scores(
        dsr([v["safe"] for v in judged.verdicts]), pp_values, lpips_by_split, benign_acc, len(benign)
    )


def record(
    cell: Cell,
    made: Originals,
    ck: Unlearned,
    conc: ConceptGuidance,
    samples: Samples,
    judged: Judged,
    scores: Scores,
    tracker=None,
) -> dict[str, Any]:
    """Stage 6: the image and cell rows, written together (atomically) to the results folder and the
    job folder, the results index, then the tracker."""
    from unlearn_exp.evaluation.records import cell_table, image_table, write_table

    cfg = cell.cfg
    the_judge, metric = cell.judge, cell.metric
    key = cell_key(
        conc.identity,
        cell.bench_attrs,
        cell.bench,
        sample_identity(cfg, str(cell.comps.device)),
        the_judge.profile["hash"],
        metric.profile["hash"],
        cell.pp_sets,
    )
    image_rows = image_records(cell, made, samples, judged, scores, key, the_judge.profile, metric.profile)
    row = cell_record(cell, ck, conc, samples, scores, image_rows, key, the_judge.profile, metric.profile)
    images_df, cells_df = image_table(image_rows), cell_table([row])
    copy_images(image_rows, cell.out_dir / "images")
    results = Path(cfg.paths.results_dir) / str(cfg.name) / key
    with atomic_dir(results) as tmp:  # both tables or neither; an earlier result stays until then
        write_table(images_df, tmp / "images.parquet")
        write_table(cells_df, tmp / "cells.parquet")
    update_index(results.parent, row)
    write_table(images_df, cell.out_dir / "images.parquet")
    write_table(cells_df, cell.out_dir / "cells.parquet")
    atomic_write_json(cell.out_dir / "artifacts.json", cell.store.summary())
    if tracker is not None:
        tracker.log_lineage(row, ck.info, conc.concept, results, cell.store.built)
        bench_chunks = samples.chunks["bench"]
        tracker.log_cell(
            row, pd.DataFrame(image_rows), chunk_images(bench_chunks[0])[:16] if bench_chunks else []
        )
    return {"cell": row, "results": str(results), "artifacts": cell.store.summary()}
