"""Know the cost before you start: ``python -m unlearn_exp.plan [overrides]``.

For every cell of the sweep (``+experiment=...``'s grid; ``guidance=none`` once per checkpoint) it
prints, without running or building anything: whether the cell's result exists, the artifacts the
cell needs and which are already cached (the unlearned checkpoint, its DUO pair sets, C*'s image
set and C*), how many images remain to sample (benchmark, benign PP prompts, the original model's
references), how many UNet rows that is (images x denoising steps x the guidance's branches per
step: 2 for classifier-free guidance, 3 for SLD or SAFREE with ``lra=paper``) and how many training
steps remain. Work is named by the artifact it makes, so what several cells share (the original
model's references, a checkpoint, the ``C*`` that ``embedding=shared`` cells reuse) is counted once,
for the first cell in run order that needs it.

With a calibration file (``$UNLEARN_EXP_CALIBRATION``, default
``~/.cache/unlearn_exp/calibration.json``, one entry per model content and device:
``calibration_key``; ``--calibrate`` writes it from a short measurement on this machine at the
sweep's batch size) it estimates the time, in h:mm: seconds per UNet row of sampling, per image
(text encoding, decoding), per concept-inversion step and per UNet row of training (DUO's step runs
``3 x checkpoint.batch`` rows forward and backward, and as many forward through the frozen
reference). For each stage a cell runs it estimates the peak GPU memory from the model's sizes
(``models.memory``) and, given the card's memory (``--gpu-memory``, else this machine's GPU), whether
it fits. A prompt list that is not here (not at its path, not in the data cache: planning downloads
nothing) gets one warning for the whole plan, with the images it leaves out of the totals, which are
then a lower bound. It ends with the totals and the share of the work (in estimated time when
calibrated) that the cache saves.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unlearn_exp.atomic import atomic_write_json
from unlearn_exp.config import compose, grid, override_key, pinned_axes, sweep_params
from unlearn_exp.errors import UserError, exit_status
from unlearn_exp.families import family_of
from unlearn_exp.hashing import config_hash, file_sha256, to_plain
from unlearn_exp.identity import (
    cell_spec,
    model_content_hash,
    model_identity,
    resolved_device,
    resolved_dtype,
    spec_key,
)
from unlearn_exp.models.memory import (
    GIB,
    STAGES,
    ModelSizes,
    Stage,
    cell_stages,
    fit_verdict,
    gib,
    model_sizes,
)


def calibration_path() -> Path:
    env = os.environ.get("UNLEARN_EXP_CALIBRATION")
    return Path(env) if env else Path.home() / ".cache" / "unlearn_exp" / "calibration.json"


@dataclass
class _Model:
    """What cache keys need of a model, without loading it."""

    identity: str
    dtype: str
    device: str

    def key(self) -> dict[str, str]:
        return {"id": self.identity, "dtype": f"torch.{self.dtype}"}


@dataclass(frozen=True)
class Work:
    """One piece of work, named by the artifact it makes (cells needing the same artifact share it)."""

    key: str  # "<kind of artifact>/<hash>"; unique per artifact
    kind: str  # "images" (sampling), "duo", "esd" or "inversion" (training steps)
    count: int  # images, or training steps
    rows: int = 0  # images: UNet rows (images x denoising steps x branches per step); esd: per step
    cached: bool = False
    batch: int = 1  # duo: pairs per optimiser step; esd: rows per step


TRAIN = ("duo", "esd", "inversion")  # the kinds of work counted in training steps


def _count(work: list[Work], kinds: tuple[str, ...], attr: str = "count") -> int:
    """Images (``count``), UNet rows (``rows``) or training steps of ``work`` of the given kinds."""
    return sum(getattr(w, attr) for w in work if w.kind in kinds)


def stage_of(w: Work) -> str:
    """The stage (``models.memory.cell_stages``' names) that makes ``w``."""
    if w.kind in TRAIN:
        return w.kind
    if w.key.startswith("unlearning/duo_pairs/"):
        return "pairs"
    return "image_set" if w.key.startswith("image_sets/") else "sampling"


@dataclass(frozen=True)
class AbsentList:
    """A prompt list that is not on this machine: its images are left out of the totals."""

    key: str  # the config key that points at its file, e.g. "pp.prompts.path"
    name: str  # the list's name (its config's ``name``)
    reason: str
    images: int | None  # the images of one set of it, from its config (None: unknown without the file)


@dataclass
class CellPlan:
    overrides: list[str]
    done: bool = False
    artifacts: list[tuple[str, bool]] = field(default_factory=list)  # (what, cached)
    work: list[Work] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    absent: dict[str, AbsentList] = field(default_factory=dict)  # by set ("bench", "coco")
    stages: dict[str, Stage] = field(default_factory=dict)  # estimated GPU memory (models.memory)
    sizes: ModelSizes | None = None
    family: str = "sd1"  # the model family (unlearn_exp/families.py)

    def _sum(self, kinds: tuple[str, ...], cached: bool, attr: str = "count") -> int:
        return _count([w for w in self.work if w.cached == cached], kinds, attr)

    @property
    def images(self) -> int:  # to sample (shared ones included: see sweep_work)
        return self._sum(("images",), False)

    @property
    def images_cached(self) -> int:
        return self._sum(("images",), True)

    @property
    def unet_rows(self) -> int:
        return self._sum(("images",), False, "rows")

    @property
    def train_steps(self) -> int:
        return self._sum(TRAIN, False)

    @property
    def train_steps_cached(self) -> int:
        return self._sum(TRAIN, True)


def _cache(cfg):
    """The cell's artifact store (with the shipped caches), used only to look."""
    from unlearn_exp.cell import cell_store

    return cell_store(cfg)


def _done_spec_keys(results_dir: Path) -> set[str]:
    from unlearn_exp.report import load_cells

    if not results_dir.is_dir():
        return set()
    rows = load_cells([results_dir])
    return set(rows["spec_key"].dropna().astype(str)) if "spec_key" in rows else set()


CFG_ROWS = 2  # classifier-free guidance: uncond and prompt


@dataclass
class _PlanInputs:
    """What every planning step reads: config, cache (only looked in), model, steps, the cell's name."""

    cfg: Any
    cache: Any
    model: _Model
    steps: int
    unique: str  # for work whose artifact cannot be named yet


def plan_cell(cfg, overrides: list[str], done_keys: set[str]) -> CellPlan:
    """What one cell needs and what of it the cache already holds: checkpoint, concept, images."""
    p = CellPlan(overrides=overrides, family=family_of(to_plain(cfg.model)).name)
    p.done = spec_key(cell_spec(cfg)) in done_keys
    cache = _cache(cfg)
    model = _Model(_plan_identity(cfg.model), resolved_dtype(cfg.model), resolved_device(cfg.model))
    at = _PlanInputs(cfg, cache, model, int(cfg.sampling.steps), f"cell:{config_hash(overrides)}")
    checkpoint_id = _plan_checkpoint(p, at)
    concept_id = _plan_concept(p, at, checkpoint_id)
    _plan_images(p, at, checkpoint_id, concept_id)
    return p


def _plan_checkpoint(p: CellPlan, at: _PlanInputs) -> str | None:
    """The unlearned checkpoint (and its pair sets); its id where it can be named, else None."""
    ck = dict(to_plain(at.cfg.checkpoint))
    if ck.get("method") == "duo" and not ck.get("path"):
        return _plan_duo(p, at, ck)
    if ck.get("method") in ("esd", "uce") and not ck.get("path"):
        if ck["method"] == "esd":
            _plan_esd(p, at, ck)
        else:
            _plan_uce(p, at, ck)
        return None  # its images are keyed by the checkpoint's content, known once it is built
    if ck.get("method") not in ("original", None):
        p.notes.append(f"{ck.get('method')} checkpoints are not planned in detail")
    return None


def _plan_duo(p: CellPlan, at: _PlanInputs, ck: dict[str, Any]) -> str:
    """A DUO checkpoint to train (or cached), and its pair sets where it is not built; its id."""
    from unlearn_exp.cell import method_filter
    from unlearn_exp.unlearning.duo import duo_key, resolve_recipe, trained_duo_id

    judge = method_filter(ck.get("filter"))
    recipe = resolve_recipe(ck, at.cfg.task)
    key = duo_key(at.model, ck, at.cfg.task, judge)
    folder = at.cache.locate("unlearning/duo", key)
    # samples are keyed by the checkpoint's content, known once it is built; until then the
    # recipe names it in the plan (one recipe, one checkpoint)
    checkpoint_id = trained_duo_id(folder) if folder is not None else f"recipe:{config_hash(key)}"
    n_steps = sum(int(ck.get("steps") or a.get("steps") or 1000) for a in recipe["adapters"])
    p.artifacts.append((f"DUO checkpoint beta={ck.get('beta')} ({checkpoint_id})", folder is not None))
    p.work.append(
        Work(
            f"unlearning/duo/{checkpoint_id}",
            "duo",
            n_steps,
            cached=folder is not None,
            batch=int(ck.get("batch") or 1),
        )
    )
    if folder is None:
        _plan_pair_sets(p, at, ck, recipe, judge)
    return checkpoint_id


def _plan_esd(p: CellPlan, at: _PlanInputs, ck: dict[str, Any]) -> None:
    """An ESD checkpoint to train (or cached): its steps, each ``batch`` rows forward and backward
    after a partial sampling of on average ``(ddim_steps - 1) / 2`` steps and two target rows."""
    from unlearn_exp.unlearning.checkpoints import esd_key

    key = esd_key(at.model, ck, dict(to_plain(at.cfg.task)))
    folder = at.cache.locate("unlearning/esd", key)
    b, n = int(ck.get("batch") or 1), int(ck.get("ddim_steps") or 50)
    p.artifacts.append((f"ESD checkpoint {ck.get('variant')} ({config_hash(key)})", folder is not None))
    rows = round(2 * b * ((n - 1) / 2 + 1))  # frozen rows per step: the partial sampling, the targets
    p.work.append(
        Work(
            f"unlearning/esd/{config_hash(key)}",
            "esd",
            int(ck.get("steps") or 1000),
            rows=rows,
            cached=folder is not None,
            batch=b,
        )
    )


def _plan_uce(p: CellPlan, at: _PlanInputs, ck: dict[str, Any]) -> None:
    """A UCE edit: a closed form over a few prompts (seconds), listed with whether it is cached."""
    from unlearn_exp.unlearning.checkpoints import uce_key

    key = uce_key(at.model, ck, dict(to_plain(at.cfg.task)))
    folder = at.cache.locate("unlearning/uce", key)
    p.artifacts.append((f"UCE edit, closed form ({config_hash(key)})", folder is not None))


def _plan_pair_sets(p: CellPlan, at: _PlanInputs, ck: dict[str, Any], recipe, judge) -> None:
    """The DUO pair sets an unbuilt checkpoint trains on, as images to sample."""
    from unlearn_exp.unlearning.duo import pair_set_keys

    for spec, _, sampling, pkey in pair_set_keys(at.model, ck, recipe, judge=judge):
        cached = at.cache.locate("unlearning/duo_pairs", pkey) is not None
        p.artifacts.append((f"DUO pairs {spec['name']} ({config_hash(pkey)})", cached))
        # at least one try per image (rejected images are tried again): the unsafe image from
        # noise, its safe counterpart by SDEdit over int(steps x strength) steps
        n = int(spec.get("n_pairs", 1))
        pair_steps = int(sampling.get("steps") or at.steps)
        sdedit = min(int(pair_steps * float(spec.get("strength", 0.75))), pair_steps)
        rows = n * (pair_steps + sdedit) * CFG_ROWS
        p.work.append(Work(f"unlearning/duo_pairs/{config_hash(pkey)}", "images", 2 * n, rows, cached))


def _plan_concept(p: CellPlan, at: _PlanInputs, checkpoint_id: str | None) -> str:
    """``C*`` and its image set, where the cell learns one; the concept's id ("explicit" until built)."""
    cfg = at.cfg
    guided = cfg.guidance.name != "none"
    if not (guided and cfg.embedding.source != "explicit" and not cfg.embedding.get("path")):
        return "explicit"
    spec = dict(to_plain(cfg.inversion.image_set))
    if spec["source"] != "generated":
        p.notes.append(f"C* from inversion.image_set.source={spec['source']}: counted when built")
        p.work.append(Work(f"inversion/{_learned_on(cfg)}", "inversion", int(cfg.inversion.steps)))
        return "explicit"
    return _plan_inversion(p, at, spec, checkpoint_id)


def _plan_inversion(p: CellPlan, at: _PlanInputs, spec: dict[str, Any], checkpoint_id: str | None) -> str:
    """``C*`` learned on generated images: the image set where ``C*`` is not cached, then ``C*``."""
    from unlearn_exp.cell import image_set_key, inversion_key, method_filter

    cfg, model, cache = at.cfg, at.model, at.cache
    judge = method_filter(spec["filter"]) if spec["check"] else None
    ikey = image_set_key(cfg, model, judge, model.identity) if judge else None
    img_hash = config_hash(ikey) if ikey else None
    learned_on = _learned_on_id(cfg, model, cache, checkpoint_id)
    inv = inversion_key(cfg, model.identity, img_hash, learned_on) if img_hash and learned_on else None
    inv_folder = cache.locate("inversion", inv) if inv else None
    if inv_folder is None:  # the images are made only to learn C* (cell.image_set_ref)
        cached = bool(ikey) and cache.locate("image_sets", ikey) is not None
        p.artifacts.append((f"C* image set ({img_hash})", cached))
        n = int(spec["n_images"] or 0)  # at least: images the filter rejects are made again
        p.work.append(
            Work(f"image_sets/{img_hash or at.unique}", "images", n, n * at.steps * CFG_ROWS, cached)
        )
    return _plan_learned(p, cfg, inv, inv_folder)


def _plan_learned(p: CellPlan, cfg, inv: dict | None, inv_folder: Path | None) -> str:
    """The inversion that learns ``C*`` (key ``inv``); the concept's id where it is cached."""
    from unlearn_exp.cell import checkpoint_for_inversion

    n_inv = int(cfg.inversion.steps)
    if not inv:  # its checkpoint is not built yet: C* is named by the checkpoint's content then
        ck_inv = checkpoint_for_inversion(cfg)
        p.artifacts.append(
            (
                f"C* on {ck_inv.get('method')} beta={ck_inv.get('beta')} "
                "(named once its checkpoint is built)",
                False,
            )
        )
        p.work.append(Work(f"inversion/{_learned_on(cfg)}", "inversion", n_inv))
        return "explicit"
    ck_inv = checkpoint_for_inversion(cfg)
    p.artifacts.append(
        (
            f"C* on {ck_inv.get('method')} beta={ck_inv.get('beta')} ({config_hash(inv)})",
            inv_folder is not None,
        )
    )
    p.work.append(Work(f"inversion/{config_hash(inv)}", "inversion", n_inv, cached=inv_folder is not None))
    if inv_folder is None:
        return "explicit"

    return f"{cfg.embedding.source}:{file_sha256(inv_folder / 'learned_embeds.safetensors')[:16]}"


def _plan_images(p: CellPlan, at: _PlanInputs, checkpoint_id: str | None, concept_id: str) -> None:
    """The images to sample: benchmark, benign PP prompts, the original model's references."""
    from unlearn_exp.cell import rows_identity, sample_identity

    cfg, model, steps, unique = at.cfg, at.model, at.steps, at.unique
    branches = _guidance(cfg, learned=False).unet_branches(float(cfg.sampling.guidance_scale))
    sets = _prompt_sets(p, cfg, steps * branches, unique)  # a list not here: p.absent
    settings = sample_identity(cfg, str(model.device))
    size = int(cfg.sampling.chunk_size)
    original = {"model": model.identity, "checkpoint": "original", "guidance": {"name": "none"}}
    mine = _cell_identity(cfg, model, checkpoint_id, concept_id, original)
    _absent_work(p, cfg, (original, mine), settings, (steps, branches), unique)
    for name, rows in sets.items():
        for ident in _wanted(name, cfg, original, mine):
            per_row = CFG_ROWS if ident is original else branches
            if ident is None:  # C* not built yet: these images cannot be named, nor cached
                p.work.append(
                    Work(f"samples/{unique}:{name}", "images", len(rows), len(rows) * steps * per_row)
                )
                continue
            for start in range(0, len(rows), size):
                part = rows[start : start + size]
                key = {**ident, "sampling": settings, "rows": rows_identity(part)}
                cached = at.cache.locate("samples", key) is not None
                n = len(part)
                p.work.append(Work(f"samples/{config_hash(key)}", "images", n, n * steps * per_row, cached))


def _plan_identity(model_cfg) -> str:
    """The model's content identity; where its weights are not here, a name no cached artifact
    carries: cache keys name the weights' content, so nothing counts as cached (``weights_note``)."""
    try:
        return model_identity(model_cfg)
    except UserError:
        return f"{model_cfg.get('name')}:weights-not-here"


def weights_note(cfg) -> str:
    """One line where the model's weights are not on this machine, else ''."""
    if model_content_hash(cfg.model) is not None:
        return ""
    return (
        f"note: no weights for model '{cfg.model.name}' at model.path={cfg.model.get('path')} here: nothing "
        "is counted as cached (cache keys name the weights' content), no calibration applies, and GPU "
        "memory is estimated from the published sizes"
    )


LIST_KEYS = {"bench": "benchmark", "coco": "pp.prompts"}  # the config key of each prompt set


def _wanted(name: str, cfg, original: dict, mine: dict | None) -> list[dict | None]:
    """The sample identities a prompt set is sampled for: the cell's own, and the original model's
    references for PP."""
    refs = name != "bench" or cfg.pp.bench
    return [original, mine] if refs and mine != original else [mine]


def _prompt_sets(p: CellPlan, cfg, rows_per_image: int, unique: str) -> dict[str, list[dict]]:
    """The rows of the cell's prompt sets that are here; a list that is not is recorded in ``p.absent``.
    Generated prompts (Ring-A-Bell) are counted from their base prompts: planning generates nothing."""
    sets = {}
    for name, bench_cfg in (("bench", cfg.benchmark), ("coco", cfg.pp.get("prompts"))):
        if bench_cfg is None:
            continue
        key, per_prompt = LIST_KEYS[name], int(bench_cfg.get("images_per_prompt") or 1)
        if str(bench_cfg.get("loader")) != "ring_a_bell":
            rows = _prompt_rows(p, name, key, bench_cfg, cfg.paths.data_dir, per_prompt)
            if rows is not None:
                sets[name] = rows
            continue
        base = _prompt_rows(p, name, f"{key}.base", bench_cfg.base, cfg.paths.data_dir, per_prompt)
        if base is None:
            continue
        passes = len(base) * int(bench_cfg.population) * (int(bench_cfg.generations) + 1)
        p.notes.append(
            f"Ring-A-Bell prompts for {len(base)} base prompts: up to {passes} text-encoder passes "
            "if not cached"
        )
        n_img = len(base) * per_prompt
        p.work.append(Work(f"samples/{unique}:{name}", "images", n_img, n_img * rows_per_image))
    return sets


def _prompt_rows(p: CellPlan, name: str, key: str, list_cfg, data_dir, per_prompt: int) -> list[dict] | None:
    """A prompt list's rows where its file is here (a local path, or a download already in the data
    cache: planning downloads nothing); else None, and the list in ``p.absent``."""
    from unlearn_exp.cell import benchmark_rows

    reason = _absent_reason(list_cfg, data_dir, key)
    if reason is None:
        try:
            return benchmark_rows(list_cfg, _local_data_dir(list_cfg, data_dir))[0]
        except UserError as exc:
            reason = f"it could not be read here ({str(exc).strip().splitlines()[0]})"
    n = list_cfg.get("expected_prompts")
    if n is not None and list_cfg.get("limit") is not None:
        n = min(int(n), int(list_cfg.limit))
    images = None if n is None else int(n) * per_prompt
    p.absent[name] = AbsentList(f"{key}.path", str(list_cfg.get("name")), reason, images)
    return None


def _absent_reason(list_cfg, data_dir, key: str) -> str | None:
    """Why a prompt file is not here, or None where it is (or the list is not a file: its loader says)."""
    from unlearn_exp.data import LOADERS, pinned_download_path

    if str(list_cfg.get("loader", "prompts_file")) not in LOADERS:
        return None
    path = list_cfg.get("path")
    if path:
        return None if Path(str(path)).expanduser().is_file() else f"no file at {key}.path={path}"
    if not list_cfg.get("url"):
        hint = list_cfg.get("source_hint")
        return f"{key}.path is not set and the list has no public download" + (f" ({hint})" if hint else "")
    pinned = pinned_download_path(list_cfg, data_dir) if data_dir else None
    if pinned is not None and pinned.is_file():
        return None
    return (
        f"not in the data cache ({pinned or 'paths.data_dir is not set'}) and {key}.path is not set; "
        "planning downloads nothing (a run downloads it from its pinned url)"
    )


def _absent_work(p: CellPlan, cfg, idents: tuple, settings, steps_branches: tuple[int, int], unique: str):
    """The images the cell's absent prompt lists would add, as ``absent`` work (never in the totals):
    named like the samples they would be, so a sweep counts what its cells share once."""
    steps, branches = steps_branches
    original, mine = idents
    for name, absent in p.absent.items():
        generated = absent.key.endswith(".base.path")  # Ring-A-Bell: the cell's own images only
        for ident in [None] if generated else _wanted(name, cfg, original, mine):
            tag = unique if ident is None else config_hash({**ident, "sampling": settings})
            n = absent.images or 0
            per_row = CFG_ROWS if ident is original else branches
            p.work.append(Work(f"absent/{absent.key}:{absent.name}/{tag}", "absent", n, n * steps * per_row))


def _local_data_dir(bench_cfg, data_dir) -> str | None:
    """``data_dir`` where the benchmark's pinned download is already there, else None (no download)."""
    from unlearn_exp.data import pinned_download_path

    if bench_cfg.get("path") or not bench_cfg.get("url"):
        return data_dir
    return data_dir if pinned_download_path(bench_cfg, data_dir).is_file() else None


def _learned_on_id(cfg, model, cache, own_id: str | None) -> str | None:
    """The content id of the checkpoint ``C*`` is learned on (``cell.learned_on_checkpoint``), where
    it is built; None where it is not (``C*`` cannot be named yet)."""
    from unlearn_exp.cell import checkpoint_for_inversion, method_filter

    target = checkpoint_for_inversion(cfg)
    if target == to_plain(cfg.checkpoint):
        if target.get("method") == "original":
            return "original"
        return own_id if own_id and not own_id.startswith("recipe:") else None
    if target.get("method") == "duo" and not target.get("path"):
        from unlearn_exp.unlearning.duo import duo_key, trained_duo_id

        folder = cache.locate(
            "unlearning/duo", duo_key(model, target, cfg.task, method_filter(target.get("filter")))
        )
        return trained_duo_id(folder) if folder is not None else None
    return None


def _learned_on(cfg) -> str:
    """A name for a ``C*`` whose key cannot be computed before building (its images are not named
    yet): the checkpoint it is learned on and the inversion settings, so that the cells sharing it
    (``embedding=shared``, SLD and SAFREE of one checkpoint) count it once."""
    from unlearn_exp.cell import checkpoint_for_inversion

    return "learned-on:" + config_hash(
        {"checkpoint": checkpoint_for_inversion(cfg), "inversion": to_plain(cfg.inversion)}
    )


def _guidance(cfg, learned: bool, concept_id: str = "explicit"):
    """The cell's guidance object as the cell builds it (nothing loaded)."""
    from unlearn_exp.guidance.base import Concept
    from unlearn_exp.guidance.factory import make_guidance

    tokens = [str(cfg.inversion.placeholder)] if learned else []
    concept = Concept(str(cfg.embedding.source) if learned else "explicit", tokens, concept_id)
    scale = 1.0
    if cfg.sampling.scale_step_counts:
        scale = int(cfg.sampling.steps) / int(cfg.sampling.reference_steps)
    return make_guidance(cfg.guidance, cfg.task, concept, step_scale=scale)


def _cell_identity(cfg, model: _Model, checkpoint_id, concept_id: str, original: dict) -> dict | None:
    """The sample identity of the cell's own images, where it can be known before building."""
    method = cfg.checkpoint.method
    if method == "original" and cfg.guidance.name == "none":
        return original
    if method == "original":
        checkpoint_id = "original"
    if checkpoint_id is None:
        return None
    learned = cfg.guidance.name != "none" and cfg.embedding.source != "explicit"
    if learned and concept_id == "explicit":
        return None
    guidance = _guidance(cfg, learned, concept_id)
    ident = {"model": model.identity, "checkpoint": checkpoint_id, "guidance": guidance.describe()}
    if cfg.guidance.name != "none":
        if not learned:  # as cell.resolve_concept names the explicit words
            texts = {
                "task": cfg.task.name,
                "sld": cfg.task.sld_concept,
                "keywords": list(cfg.task.safree_keywords),
            }
            concept_id = f"explicit:{config_hash(texts)}"
        ident["concept"] = concept_id
    return ident


CALIBRATION_KEYS = ("s_per_unet_row", "s_per_image", "s_per_inversion_step", "s_per_train_row")


def device_identity(device: str) -> str:
    """The device a calibration was measured on: ``cuda:<its name>``, or ``cpu:<processor> (<n>
    threads)``; another card, processor or thread count is another calibration."""
    import torch

    if device.startswith("cuda"):
        return f"cuda:{torch.cuda.get_device_name(torch.device(device))}"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu:{name} ({torch.get_num_threads()} threads)"


def calibration_key(model_cfg) -> str | None:
    """A calibration's entry: the model's content identity (its weights' sha256, cached; dtype;
    resolution) and the device, ``<identity>@<device>``; None where the weights are not here."""
    try:
        identity = model_identity(model_cfg)
    except UserError:
        return None
    return f"{identity}@{device_identity(resolved_device(model_cfg))}"


def _costs(calib: dict[str, Any] | None, key: str | None) -> tuple[dict[str, float] | None, str]:
    """The calibrated costs for ``key`` (``calibration_key``), or None and why not."""
    calib = calib or {}
    c = calib.get(key) if key else None
    if c and all(k in c for k in CALIBRATION_KEYS):
        return {k: float(c[k]) for k in CALIBRATION_KEYS}, ""
    if key is None:
        why = "no calibration applies: the model's weights are not here (a calibration names them)"
    elif c:
        why = f"the calibration for {key} is from an older version"
    else:
        why = f"no calibration for {key}"
    by_name = sorted(k for k in calib if "@" not in k)
    if by_name:  # written before calibrations named weights and device: they may be of others
        why += f"; entries keyed by model name only ({', '.join(by_name)}) are ignored"
    return None, why + ": `python -m unlearn_exp.plan --calibrate ...` measures it"


def hmm(seconds: float) -> str:
    """A duration as h:mm: ``about 1:45 h:mm``."""
    minutes = round(seconds / 60)
    if seconds > 0 and minutes == 0:
        return "under 0:01 h:mm"
    return f"about {minutes // 60}:{minutes % 60:02d} h:mm"


def work_seconds(w: Work, c: dict[str, float]) -> float:
    """The estimated time of one piece of work, from the calibrated costs ``c``."""
    if w.kind == "images":
        return w.rows * c["s_per_unet_row"] + w.count * c["s_per_image"]
    if w.kind == "inversion":
        return w.count * c["s_per_inversion_step"]
    if w.kind == "absent":  # images of a prompt list that is not here: not estimated
        return 0.0
    if w.kind == "duo":  # 3b rows forward and backward, and the same rows through the frozen reference
        rows = 3 * w.batch
        return w.count * rows * (c["s_per_train_row"] + c["s_per_unet_row"])
    if w.kind == "esd":  # b rows forward and backward (priced as DUO's), ``rows`` frozen rows a step
        return w.count * (w.batch * c["s_per_train_row"] + w.rows * c["s_per_unet_row"])
    raise ValueError(f"unknown work kind {w.kind!r}")


def sweep_work(plans: list[CellPlan]) -> list[tuple[list[Work], list[Work]]]:
    """Per cell, in run order: (the work it does, the work an earlier cell does for it). A piece of
    work is done by the first cell that needs it and is not cached; a recorded cell does nothing."""
    seen: set[str] = set()
    out = []
    for p in plans:
        own, shared = [], []
        for w in p.work:
            if w.cached or p.done:
                continue
            (shared if w.key in seen else own).append(w)
            seen.add(w.key)
        out.append((own, shared))
    return out


def _estimate(work: list[Work], costs: dict[str, float] | None) -> float | None:
    return None if costs is None else sum(work_seconds(w, costs) for w in work)


def calibrate(cfg, path: Path) -> dict[str, Any]:
    """Measure this machine's costs for ``cfg.model`` at ``cfg``'s batch sizes: sampling with
    classifier-free guidance at ``sampling.batch_size`` over 1 and 1 + k steps (the difference is
    the UNet rows, the rest the per-image cost: text encoding, decoding), and the UNet forward and
    backward to the prompt embedding (what concept inversion and DUO's LoRA train through) at
    ``inversion.batch_size`` and at DUO's ``3 x checkpoint.batch`` rows. Each time is the median of
    three runs after a warm-up."""
    import torch

    from unlearn_exp.models import load_model
    from unlearn_exp.sampling import sample

    comps = load_model(cfg.model)
    b = int(cfg.sampling.batch_size)
    prompts, seeds = ["a photo"] * b, list(range(b))

    def timed(fn, repeat: int = 3) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return sorted(times)[repeat // 2]  # the median: the best run is a burst a sweep does not keep up

    with torch.no_grad():
        sampler = str(cfg.sampling.scheduler)  # the family's (SD3: flow_euler)
        t1 = timed(lambda: sample(comps, prompts, seeds, steps=1, scheduler=sampler))
        # enough further steps for about two seconds of UNet time (2 to 20): the difference is the rows
        k = min(max(math.ceil(2.0 / max(t1, 1e-3)), 2), 20)
        tk = timed(lambda: sample(comps, prompts, seeds, steps=1 + k, scheduler=sampler))
    per_row = max(tk - t1, 1e-9) / (k * 2 * b)
    per_image = max(t1 - 2 * b * per_row, 0.0) / b

    comps.denoiser.eval().requires_grad_(False)
    with torch.no_grad():
        e = comps.condition_prompts(["a photo"])

    def train_pass(rows: int) -> float:
        x = torch.randn(rows, *comps.latent_shape(), device=comps.device, dtype=comps.dtype)
        cond = e.expand(rows).detach()
        cond.sequence = cond.sequence.clone().requires_grad_(True)  # the gradient to the prompt embedding
        t = torch.full((rows,), 10, device=comps.device)
        return timed(lambda: comps.denoise(x, t, cond).pow(2).mean().backward())

    inv_step = train_pass(int(cfg.inversion.batch_size))
    duo_rows = 3 * int(cfg.checkpoint.get("batch") or 4)
    per_train_row = train_pass(duo_rows) / duo_rows
    table = json.loads(path.read_text()) if path.is_file() else {}
    key = calibration_key(cfg.model)
    if key is None:  # not reached: the model loaded, so its weights are here
        raise UserError(f"no weights for model '{cfg.model.name}': nothing to calibrate")
    table[key] = {
        "model": str(cfg.model.name),
        "s_per_unet_row": per_row,
        "s_per_image": per_image,
        "s_per_inversion_step": inv_step,
        "s_per_train_row": per_train_row,
        "sampling_batch": b,
        "threads": torch.get_num_threads(),
        "measured": time.strftime("%Y-%m-%d %H:%M"),
        "device": str(comps.device),
        "device_name": key.rsplit("@", 1)[1],
    }

    atomic_write_json(path, table)
    return table


def plan(overrides: list[str]) -> tuple[list[CellPlan], Any]:
    base = list(overrides)
    try:
        cells = grid(base)
    except Exception:  # no sweep in the config: the one cell the overrides describe
        cells = [[]]
    swept = {override_key(o) for o in cells[0]}
    base = [o for o in base if override_key(o) not in swept]  # a cell's own values replace the sweep's
    first = compose([*base, *cells[0]])
    done = _done_spec_keys(Path(first.paths.results_dir))
    plans = []
    for c in cells:
        cfg = compose([*base, *c])
        plans.append(with_memory(plan_cell(cfg, c, done), cfg))
    return plans, first


def with_memory(p: CellPlan, cfg) -> CellPlan:
    """``p`` with the estimated GPU memory of the stages its cell may run (``models.memory``)."""
    p.sizes = _sizes(to_plain(cfg.model))
    if p.sizes is not None:
        branches = _guidance(cfg, learned=False).unet_branches(float(cfg.sampling.guidance_scale))
        p.stages = cell_stages(cfg, p.sizes, branches, _most_pairs(cfg), _esd_trained(cfg, p.sizes))
    return p


def _esd_trained(cfg, sizes: ModelSizes) -> int:
    """The parameters the cell's ESD variant trains, from the model's parameter names (0 without ESD)."""
    ck = dict(to_plain(cfg.checkpoint))
    if ck.get("method") != "esd" or ck.get("path"):
        return 0
    from unlearn_exp.unlearning.esd import esd_select

    chosen = esd_select(list(sizes.denoiser_params), str(ck.get("variant") or "esd-u"), sizes.family)
    return sum(sizes.denoiser_params[n] for n in chosen)


def _most_pairs(cfg) -> int:
    """The most pairs one DUO adapter of the cell's recipe trains on (1 where there is none)."""
    from unlearn_exp.unlearning.duo import resolve_recipe

    ck = dict(to_plain(cfg.checkpoint))
    if ck.get("method") != "duo" or ck.get("path"):
        return 1
    return max([int(a.get("n_pairs", 1)) for a in resolve_recipe(ck, cfg.task)["adapters"]] or [1])


_SIZES: dict[str, ModelSizes | None] = {}


def _sizes(model_cfg: dict) -> ModelSizes | None:
    key = config_hash(model_cfg)
    if key not in _SIZES:
        _SIZES[key] = model_sizes(model_cfg)
    return _SIZES[key]


def pinned_note(overrides: list[str], n_cells: int) -> str:
    """One line where the overrides set a key the experiment sweeps: the plan, like the launcher,
    keeps only those values (``config.pinned_axes``)."""
    try:
        params = sweep_params(overrides)
    except Exception:  # no sweep: nothing to restrict
        return ""
    pinned = pinned_axes(overrides, params)
    if not pinned:
        return ""
    which = ", ".join(f"{k}={v} (the sweep has {params[k]})" for k, v in pinned.items())
    return (
        f"note: the overrides set swept keys: {which}; the sweep runs {n_cells} cell(s), as the launcher does"
    )


def render(
    plans: list[CellPlan], calib: dict | None, calib_key: str | None, gpu_gib: float | None = None
) -> str:
    """The plan as text: a line per cell, the GPU memory per stage, the absent prompt lists, the
    totals. ``calib_key``: the calibration's entry (``calibration_key``); ``gpu_gib``: the card's memory."""
    costs, why = _costs(calib, calib_key)
    per_cell = sweep_work(plans)
    lines = []
    for i, (p, (own, shared)) in enumerate(zip(plans, per_cell), 1):
        lines += _cell_lines(f"[{i:2d}/{len(plans)}]", p, own, shared, costs, gpu_gib)
    todo = [w for own, _ in per_cell for w in own]
    lines += _memory_lines(plans, per_cell, gpu_gib)
    lines += _absent_lines(plans, per_cell)
    text = "\n".join(lines + _total_lines(plans, todo, costs, why))
    if plans and all(p.family == "sd3" for p in plans):  # SD3's denoiser is a transformer
        text = text.replace("UNet rows", "transformer rows")
    return text


def _cell_peak(p: CellPlan, own: list[Work]) -> Stage | None:
    """The stage of the highest estimated GPU memory among those the cell runs."""
    names = {stage_of(w) for w in own} | (set() if p.done else {"judging"})
    stages = [p.stages[n] for n in names if n in p.stages]
    return max(stages, key=lambda s: s.peak, default=None)


def _cell_lines(tag: str, p: CellPlan, own: list[Work], shared: list[Work], costs, gpu_gib) -> list[str]:
    est = _estimate(own, costs)
    status = "done" if p.done else "to run"
    need = ", ".join(f"{w} [{'cached' if c else 'build'}]" for w, c in p.artifacts) or "-"
    by_earlier = _count(shared, ("images",))
    peak = _cell_peak(p, own)
    memory = "" if peak is None else f"; GPU peak ~{gib(peak.peak)} GiB ({peak.name})"
    fit = fit_verdict(peak.peak, gpu_gib) if peak is not None else ""
    return [
        f"{tag} {' '.join(p.overrides) or '(one cell)'}: {status}; images to sample "
        f"{_count(own, ('images',))} ({p.images_cached} cached"
        + (f", {by_earlier} made by an earlier cell" if by_earlier else "")
        + f"), UNet rows {_count(own, ('images',), 'rows')}, training steps {_count(own, TRAIN)} "
        f"({p.train_steps_cached} cached)"
        + (f", {hmm(est)}" if est is not None else "")
        + memory
        + (f": {fit}" if fit else ""),
        f"        needs: {need}",
        *[f"        note: {n}" for n in p.notes],
    ]


def _memory_lines(plans: list[CellPlan], per_cell, gpu_gib: float | None) -> list[str]:
    """The estimated GPU memory of each stage the sweep runs, once per stage and size."""
    sizes = next((p.sizes for p in plans if p.sizes is not None), None)
    if sizes is None:
        family = plans[0].family if plans else "sd1"
        if family != "sd1":
            return [
                f"GPU memory: not estimated for the {family} family yet (its activations are not measured)"
            ]
        return ["GPU memory: not estimated (no sizes for this model: no weights here, no published sizes)"]
    stages: dict[tuple[int, str, str], Stage] = {}
    for p, (own, _) in zip(plans, per_cell):
        names = {stage_of(w) for w in own} | (set() if p.done else {"judging"})
        for name in names & set(p.stages):
            stages.setdefault((STAGES.index(name), p.stages[name].name, p.stages[name].what), p.stages[name])
    params = ", ".join(f"{part} {n / 1e6:.1f}M" for part, n in sizes.params.items())
    card = f"a {gpu_gib:g} GiB card" if gpu_gib else "no card size: --gpu-memory GIB checks the fit"
    lines = [f"GPU memory per stage (an estimate; {params} parameters, {sizes.source}; {card}):"]
    for _, s in sorted(stages.items(), key=lambda kv: kv[0]):
        fit = fit_verdict(s.peak, gpu_gib)
        lines.append(
            f"  {s.name} ({s.what}): ~{gib(s.peak)} GiB (weights {gib(s.weights)}, held {gib(s.held)}, "
            f"activations {gib(s.activations)})" + (f": {fit}" if fit else "")
        )
    return lines if stages else lines[:1] + ["  nothing to run"]


def _absent_lines(plans: list[CellPlan], per_cell) -> list[str]:
    """One warning per prompt list that is not here: which, why, and what it leaves out of the totals."""
    lists: dict[str, AbsentList] = {}
    work: dict[str, list[Work]] = {}  # by "<config key>:<name>", what the cells to run would sample
    cells: dict[str, set[int]] = {}
    for i, (p, (own, _)) in enumerate(zip(plans, per_cell)):
        for absent in p.absent.values():
            lists.setdefault(f"{absent.key}:{absent.name}", absent)
        for w in (w for w in own if w.kind == "absent"):
            work.setdefault(w.key.split("/")[1], []).append(w)
            cells.setdefault(w.key.split("/")[1], set()).add(i)
    lines = []
    for key, left in work.items():
        absent = lists[key]
        images = (
            f"{_count(left, ('absent',)):,} images ({_count(left, ('absent',), 'rows'):,} UNet rows; "
            f"the list gives {absent.images:,} images a set)"
            if absent.images is not None
            else "an unknown number of images (its config gives no expected_prompts)"
        )
        lines.append(
            f"warning: prompt list '{absent.name}' ({absent.key}) is not here: {absent.reason}. The "
            f"{len(cells[key])} cell(s) that sample it would add {images}, not counted: the totals below "
            "are a lower bound"
        )
    return lines


def _total_lines(plans: list[CellPlan], todo: list[Work], costs, why: str) -> list[str]:
    done_keys = {w.key for w in todo}
    held: dict[str, Work] = {}  # what the cache (or a recorded cell) already holds, each artifact once
    for p in plans:
        for w in p.work:
            if (w.cached or p.done) and w.key not in done_keys and w.kind != "absent":
                held.setdefault(w.key, w)
    saved = list(held.values())
    images, rows, steps = _count(todo, ("images",)), _count(todo, ("images",), "rows"), _count(todo, TRAIN)
    bound = any(w.kind == "absent" for w in todo)
    lines = [
        f"total: {len(plans)} cells ({sum(p.done for p in plans)} done), {'at least ' if bound else ''}"
        f"{images} images to sample ({rows} UNet rows), {steps} training steps; each shared artifact "
        "counted once" + ("; a lower bound: prompt lists are not here (warnings above)" if bound else "")
    ]
    if costs is not None:
        left, kept = _estimate(todo, costs), _estimate(saved, costs)
        share = kept / (left + kept) if left + kept else 1.0
        lines.append(
            f"estimated time: {hmm(left)}{' at least' if bound else ''} on this machine "
            f"({calibration_path()}); the cache saves {share:.0%} of it ({hmm(kept)}: "
            f"{_count(saved, ('images',))} images, {_count(saved, TRAIN)} training steps)"
        )
    else:
        lines.append(
            f"the cache holds {_count(saved, ('images',))} images and {_count(saved, TRAIN)} training "
            f"steps; {why}"
        )
    return lines


def gpu_memory_here(cfg) -> float | None:
    """The memory of the GPU the model would run on here, in GiB; None without one."""
    device = resolved_device(cfg.model)
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.get_device_properties(torch.device(device)).total_memory / GIB


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m unlearn_exp.plan", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--calibrate", action="store_true", help="measure this machine's costs for the model first"
    )
    ap.add_argument(
        "--gpu-memory",
        type=float,
        metavar="GIB",
        help="the GPU's memory in GiB, to say whether each stage fits (default: this machine's GPU)",
    )
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m unlearn_exp")
    args = ap.parse_intermixed_args(argv)  # options before, between or after the overrides
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    def run() -> int:
        plans, cfg = plan(list(args.overrides))
        for note in (pinned_note(list(args.overrides), len(plans)), weights_note(cfg)):
            if note:
                print(note)
        if args.calibrate:
            calibrate(cfg, calibration_path())
        calib = json.loads(calibration_path().read_text()) if calibration_path().is_file() else None
        gpu = args.gpu_memory if args.gpu_memory is not None else gpu_memory_here(cfg)
        print(render(plans, calib, calibration_key(cfg.model), gpu))
        return 0

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
