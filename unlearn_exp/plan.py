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
``~/.cache/unlearn_exp/calibration.json``, per model name; ``--calibrate`` writes it from a short
measurement on this machine at the sweep's batch size) it estimates the time: seconds per UNet row
of sampling, per image (text encoding, decoding), per concept-inversion step and per UNet row of
training (DUO's step runs ``3 x checkpoint.batch`` rows forward and backward, and as many forward
through the frozen reference). It ends with the totals and the share of the work (in estimated time
when calibrated) that the cache saves.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unlearn_exp.errors import UserError, exit_status
from unlearn_exp.store import config_hash, to_plain


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
    kind: str  # "images" (sampling), "duo" or "inversion" (training steps)
    count: int  # images, or training steps
    rows: int = 0  # images: UNet rows (images x denoising steps x branches per step)
    cached: bool = False
    batch: int = 1  # duo: pairs per optimiser step


def _count(work: list[Work], kinds: tuple[str, ...], attr: str = "count") -> int:
    """Images (``count``), UNet rows (``rows``) or training steps of ``work`` of the given kinds."""
    return sum(getattr(w, attr) for w in work if w.kind in kinds)


@dataclass
class CellPlan:
    overrides: list[str]
    done: bool = False
    artifacts: list[tuple[str, bool]] = field(default_factory=list)  # (what, cached)
    work: list[Work] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

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
        return self._sum(("duo", "inversion"), False)

    @property
    def train_steps_cached(self) -> int:
        return self._sum(("duo", "inversion"), True)


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


def plan_cell(cfg, overrides: list[str], done_keys: set[str]) -> CellPlan:
    """What one cell needs and what of it the cache already holds."""
    from unlearn_exp.cell import (
        benchmark_rows,
        checkpoint_for_inversion,
        image_set_key,
        inversion_key,
        method_filter,
        rows_identity,
        sample_identity,
    )
    from unlearn_exp.identity import cell_spec, model_identity, resolved_device, resolved_dtype, spec_key

    p = CellPlan(overrides=overrides)
    p.done = spec_key(cell_spec(cfg)) in done_keys
    cache = _cache(cfg)
    model = _Model(model_identity(cfg.model), resolved_dtype(cfg.model), resolved_device(cfg.model))
    steps = int(cfg.sampling.steps)
    cfg_rows = 2  # classifier-free guidance: uncond and prompt
    unique = f"cell:{config_hash(overrides)}"  # for work whose artifact cannot be named yet

    # the unlearned checkpoint (and its pair sets)
    ck = dict(to_plain(cfg.checkpoint))
    checkpoint_id = None
    if ck.get("method") == "duo" and not ck.get("path"):
        from unlearn_exp.unlearning.duo import duo_key, pair_set_keys, resolve_recipe, trained_duo_id

        judge = method_filter(ck.get("filter"))
        recipe = resolve_recipe(ck, cfg.task)
        key = duo_key(model, ck, cfg.task, judge)
        folder = cache.locate("unlearning/duo", key)
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
            for spec, _, sampling, pkey in pair_set_keys(model, ck, recipe, judge=judge):
                cached = cache.locate("unlearning/duo_pairs", pkey) is not None
                p.artifacts.append((f"DUO pairs {spec['name']} ({config_hash(pkey)})", cached))
                # at least one try per image (rejected images are tried again): the unsafe image from
                # noise, its safe counterpart by SDEdit over int(steps x strength) steps
                n = int(spec.get("n_pairs", 1))
                pair_steps = int(sampling.get("steps") or steps)
                sdedit = min(int(pair_steps * float(spec.get("strength", 0.75))), pair_steps)
                rows = n * (pair_steps + sdedit) * cfg_rows
                p.work.append(
                    Work(f"unlearning/duo_pairs/{config_hash(pkey)}", "images", 2 * n, rows, cached)
                )
    elif ck.get("method") not in ("original", None):
        p.notes.append(f"{ck.get('method')} checkpoints are not planned in detail")

    # the concept embedding C* and its image set
    guided = cfg.guidance.name != "none"
    concept_id = "explicit"
    if guided and cfg.embedding.source != "explicit" and not cfg.embedding.get("path"):
        spec = dict(to_plain(cfg.inversion.image_set))
        if spec["source"] == "generated":
            judge = method_filter(spec["filter"]) if spec["check"] else None
            ikey = image_set_key(cfg, model, judge, model.identity) if judge else None
            img_hash = config_hash(ikey) if ikey else None
            learned_on = _learned_on_id(cfg, model, cache, checkpoint_id)
            inv = (
                inversion_key(cfg, model.identity, img_hash, learned_on) if img_hash and learned_on else None
            )
            inv_folder = cache.locate("inversion", inv) if inv else None
            if inv_folder is None:  # the images are made only to learn C* (cell.image_set_ref)
                cached = bool(ikey) and cache.locate("image_sets", ikey) is not None
                p.artifacts.append((f"C* image set ({img_hash})", cached))
                n = int(spec["n_images"] or 0)  # at least: images the filter rejects are made again
                p.work.append(
                    Work(f"image_sets/{img_hash or unique}", "images", n, n * steps * cfg_rows, cached)
                )
            n_inv = int(cfg.inversion.steps)
            if inv:
                ck_inv = checkpoint_for_inversion(cfg)
                p.artifacts.append(
                    (
                        f"C* on {ck_inv.get('method')} beta={ck_inv.get('beta')} ({config_hash(inv)})",
                        inv_folder is not None,
                    )
                )
                p.work.append(
                    Work(f"inversion/{config_hash(inv)}", "inversion", n_inv, cached=inv_folder is not None)
                )
                if inv_folder is not None:
                    from unlearn_exp.store import file_sha256

                    concept_id = (
                        f"{cfg.embedding.source}:"
                        f"{file_sha256(inv_folder / 'learned_embeds.safetensors')[:16]}"
                    )
            else:  # its checkpoint is not built yet: C* is named by the checkpoint's content then
                ck_inv = checkpoint_for_inversion(cfg)
                p.artifacts.append(
                    (
                        f"C* on {ck_inv.get('method')} beta={ck_inv.get('beta')} "
                        "(named once its checkpoint is built)",
                        False,
                    )
                )
                p.work.append(Work(f"inversion/{_learned_on(cfg)}", "inversion", n_inv))
        else:
            p.notes.append(f"C* from inversion.image_set.source={spec['source']}: counted when built")
            p.work.append(Work(f"inversion/{_learned_on(cfg)}", "inversion", int(cfg.inversion.steps)))

    # images: benchmark, benign PP prompts, the original model's references
    branches = _guidance(cfg, learned=False).unet_branches(float(cfg.sampling.guidance_scale))
    sets = {}
    for name, bench_cfg in (("bench", cfg.benchmark), ("coco", cfg.pp.get("prompts"))):
        if bench_cfg is None:
            continue
        if str(bench_cfg.get("loader")) == "ring_a_bell":  # generated prompts: planning generates nothing
            base = bench_cfg.base
            try:
                n = len(benchmark_rows(base, _local_data_dir(base, cfg.paths.data_dir))[0])
            except UserError as exc:
                p.notes.append(f"{name} base prompts unknown here ({str(exc).splitlines()[0][:90]})")
                continue
            passes = n * int(bench_cfg.population) * (int(bench_cfg.generations) + 1)
            p.notes.append(
                f"Ring-A-Bell prompts for {n} base prompts: up to {passes} text-encoder passes if not cached"
            )
            n_img = n * int(bench_cfg.get("images_per_prompt") or 1)
            p.work.append(Work(f"samples/{unique}:{name}", "images", n_img, n_img * steps * branches))
            continue
        try:  # read a local or already downloaded file only: planning downloads nothing
            sets[name] = benchmark_rows(bench_cfg, _local_data_dir(bench_cfg, cfg.paths.data_dir))[0]
        except UserError as exc:
            p.notes.append(f"{name} prompts unknown here ({str(exc).splitlines()[0][:90]})")
    settings = sample_identity(cfg, str(model.device))
    size = int(cfg.sampling.chunk_size)
    original = {"model": model.identity, "checkpoint": "original", "guidance": {"name": "none"}}
    mine = _cell_identity(cfg, model, checkpoint_id, concept_id, original)
    for name, rows in sets.items():
        refs = name != "bench" or cfg.pp.bench  # the original model's images for PP
        wanted = [original, mine] if refs and mine != original else [mine]
        for ident in wanted:
            per_row = cfg_rows if ident is original else branches
            if ident is None:  # C* not built yet: these images cannot be named, nor cached
                p.work.append(
                    Work(f"samples/{unique}:{name}", "images", len(rows), len(rows) * steps * per_row)
                )
                continue
            for start in range(0, len(rows), size):
                part = rows[start : start + size]
                key = {**ident, "sampling": settings, "rows": rows_identity(part)}
                cached = cache.locate("samples", key) is not None
                n = len(part)
                p.work.append(Work(f"samples/{config_hash(key)}", "images", n, n * steps * per_row, cached))
    return p


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
    from unlearn_exp.guidance import Concept, make_guidance

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


def _costs(calib: dict[str, Any] | None, model_name: str) -> dict[str, float] | None:
    c = (calib or {}).get(model_name)
    if not c or any(k not in c for k in CALIBRATION_KEYS):
        return None
    return {k: float(c[k]) for k in CALIBRATION_KEYS}


def work_seconds(w: Work, c: dict[str, float]) -> float:
    """The estimated time of one piece of work, from the calibrated costs ``c``."""
    if w.kind == "images":
        return w.rows * c["s_per_unet_row"] + w.count * c["s_per_image"]
    if w.kind == "inversion":
        return w.count * c["s_per_inversion_step"]
    if w.kind == "duo":  # 3b rows forward and backward, and the same rows through the frozen reference
        rows = 3 * w.batch
        return w.count * rows * (c["s_per_train_row"] + c["s_per_unet_row"])
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
        t1 = timed(lambda: sample(comps, prompts, seeds, steps=1))
        # enough further steps for about two seconds of UNet time (2 to 20): the difference is the rows
        k = min(max(math.ceil(2.0 / max(t1, 1e-3)), 2), 20)
        tk = timed(lambda: sample(comps, prompts, seeds, steps=1 + k))
    per_row = max(tk - t1, 1e-9) / (k * 2 * b)
    per_image = max(t1 - 2 * b * per_row, 0.0) / b

    unet = comps.unet.eval().requires_grad_(False)
    e, _ = comps.encode_prompts(["a photo"])

    def train_pass(rows: int) -> float:
        x = torch.randn(rows, *comps.latent_shape(), device=comps.device, dtype=comps.dtype)
        h = e.expand(rows, -1, -1).detach().clone().requires_grad_(True)
        t = torch.full((rows,), 10, device=comps.device)
        return timed(lambda: unet(x, t, encoder_hidden_states=h).sample.pow(2).mean().backward())

    inv_step = train_pass(int(cfg.inversion.batch_size))
    duo_rows = 3 * int(cfg.checkpoint.get("batch") or 4)
    per_train_row = train_pass(duo_rows) / duo_rows
    table = json.loads(path.read_text()) if path.is_file() else {}
    table[str(cfg.model.name)] = {
        "s_per_unet_row": per_row,
        "s_per_image": per_image,
        "s_per_inversion_step": inv_step,
        "s_per_train_row": per_train_row,
        "sampling_batch": b,
        "threads": torch.get_num_threads(),
        "measured": time.strftime("%Y-%m-%d %H:%M"),
        "device": str(comps.device),
    }
    from unlearn_exp.store import atomic_write_json

    atomic_write_json(path, table)
    return table


def plan(overrides: list[str]) -> tuple[list[CellPlan], Any]:
    from unlearn_exp.config import compose, override_key
    from unlearn_exp.demo import grid

    base = list(overrides)
    try:
        cells = grid(base)
    except Exception:  # no sweep in the config: the one cell the overrides describe
        cells = [[]]
    swept = {override_key(o) for o in cells[0]}
    base = [o for o in base if override_key(o) not in swept]  # a cell's own values replace the sweep's
    first = compose([*base, *cells[0]])
    done = _done_spec_keys(Path(first.paths.results_dir))
    return [plan_cell(compose([*base, *c]), c, done) for c in cells], first


def pinned_note(overrides: list[str], n_cells: int) -> str:
    """One line where the overrides set a key the experiment sweeps: the plan, like the launcher,
    keeps only those values (``config.pinned_axes``)."""
    from unlearn_exp.config import pinned_axes, sweep_params

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


def render(plans: list[CellPlan], calib: dict | None, model_name: str) -> str:
    costs = _costs(calib, model_name)
    train = ("duo", "inversion")
    lines = []
    per_cell = sweep_work(plans)
    for i, (p, (own, shared)) in enumerate(zip(plans, per_cell), 1):
        est = _estimate(own, costs)
        status = "done" if p.done else "to run"
        need = ", ".join(f"{w} [{'cached' if c else 'build'}]" for w, c in p.artifacts) or "-"
        by_earlier = _count(shared, ("images",))
        lines.append(
            f"[{i:2d}/{len(plans)}] {' '.join(p.overrides) or '(one cell)'}: {status}; images to sample "
            f"{_count(own, ('images',))} ({p.images_cached} cached"
            + (f", {by_earlier} made by an earlier cell" if by_earlier else "")
            + f"), UNet rows {_count(own, ('images',), 'rows')}, training steps {_count(own, train)} "
            f"({p.train_steps_cached} cached)" + (f", about {est / 60:.1f} min" if est is not None else "")
        )
        lines.append(f"        needs: {need}")
        lines += [f"        note: {n}" for n in p.notes]
    todo = [w for own, _ in per_cell for w in own]
    done_keys = {w.key for w in todo}
    held: dict[str, Work] = {}  # what the cache (or a recorded cell) already holds, each artifact once
    for p in plans:
        for w in p.work:
            if (w.cached or p.done) and w.key not in done_keys:
                held.setdefault(w.key, w)
    saved = list(held.values())
    images, rows, steps = _count(todo, ("images",)), _count(todo, ("images",), "rows"), _count(todo, train)
    lines.append(
        f"total: {len(plans)} cells ({sum(p.done for p in plans)} done), {images} images to sample "
        f"({rows} UNet rows), {steps} training steps; each shared artifact counted once"
    )
    if costs is not None:
        left, kept = _estimate(todo, costs), _estimate(saved, costs)
        share = kept / (left + kept) if left + kept else 1.0
        lines.append(
            f"estimated time: {left / 60:.1f} min on this machine ({calibration_path()}); the cache saves "
            f"{share:.0%} of it ({kept / 60:.1f} min: {_count(saved, ('images',))} images, "
            f"{_count(saved, train)} training steps)"
        )
    else:
        lines.append(
            f"the cache holds {_count(saved, ('images',))} images and {_count(saved, train)} training steps; "
            f"no calibration for model '{model_name}' (or one from an older version): "
            "`python -m unlearn_exp.plan --calibrate ...` measures it"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import logging

    ap = argparse.ArgumentParser(prog="python -m unlearn_exp.plan", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--calibrate", action="store_true", help="measure this machine's costs for the model first"
    )
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m unlearn_exp")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    def run() -> int:
        plans, cfg = plan(list(args.overrides))
        note = pinned_note(list(args.overrides), len(plans))
        if note:
            print(note)
        if args.calibrate:
            calibrate(cfg, calibration_path())
        calib = json.loads(calibration_path().read_text()) if calibration_path().is_file() else None
        print(render(plans, calib, str(cfg.model.name)))
        return 0

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
