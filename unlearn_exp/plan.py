"""Know the cost before you start: ``python -m unlearn_exp.plan [overrides]``.

For every cell of the sweep (``+experiment=...``'s grid; ``guidance=none`` once per checkpoint) it
prints, without running or building anything: whether the cell's result exists, the artifacts the
cell needs and which are already cached (the unlearned checkpoint, its DUO pair sets, C*'s image
set and C*), how many images remain to sample (benchmark, benign PP prompts, the original model's
references) and how many training steps remain. With a calibration file
(``$UNLEARN_EXP_CALIBRATION``, default ``~/.cache/unlearn_exp/calibration.json``: seconds per image
per sampling step and per training step, per model name; ``--calibrate`` writes it from a short
measurement on this machine) it estimates the time. It ends with the totals and the share of the
work that the cache saves.
"""

from __future__ import annotations

import argparse
import json
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


@dataclass
class CellPlan:
    overrides: list[str]
    done: bool = False
    artifacts: list[tuple[str, bool]] = field(default_factory=list)  # (what, cached)
    images: int = 0  # to sample
    images_cached: int = 0
    train_steps: int = 0
    train_steps_cached: int = 0
    sampling_steps: int = 0
    notes: list[str] = field(default_factory=list)


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
        _rows_identity,
        benchmark_rows,
        checkpoint_for_inversion,
        image_set_key,
        inversion_key,
        method_filter,
        sample_identity,
    )
    from unlearn_exp.identity import cell_spec, model_identity, resolved_device, resolved_dtype, spec_key

    p = CellPlan(overrides=overrides)
    p.done = spec_key(cell_spec(cfg)) in done_keys
    cache = _cache(cfg)
    model = _Model(model_identity(cfg.model), resolved_dtype(cfg.model), resolved_device(cfg.model))
    steps = int(cfg.sampling.steps)

    # the unlearned checkpoint (and its pair sets)
    ck = dict(to_plain(cfg.checkpoint))
    checkpoint_id = None
    if ck.get("method") == "duo" and not ck.get("path"):
        from unlearn_exp.unlearning.duo import duo_key, pair_set_keys, resolve_recipe

        judge = method_filter(ck.get("filter"))
        recipe = resolve_recipe(ck, cfg.task)
        key = duo_key(model, ck, cfg.task, judge)
        folder = cache.locate("unlearning/duo", key)
        checkpoint_id = config_hash(key)
        n_steps = sum(int(ck.get("steps") or a.get("steps") or 1000) for a in recipe["adapters"])
        p.artifacts.append((f"DUO checkpoint beta={ck.get('beta')} ({checkpoint_id})", folder is not None))
        if folder is None:
            p.train_steps += n_steps
            for spec, _, sampling, pkey in pair_set_keys(model, ck, recipe, judge=judge):
                cached = cache.locate("unlearning/duo_pairs", pkey) is not None
                p.artifacts.append((f"DUO pairs {spec['name']} ({config_hash(pkey)})", cached))
                n = 2 * int(spec.get("n_pairs", 1))
                if cached:
                    p.images_cached += n
                else:  # at least one try per image; rejected images are tried again
                    p.images += n
                    p.sampling_steps += n * int(sampling.get("steps") or steps)
        else:
            p.train_steps_cached += n_steps
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
            inv = inversion_key(cfg, model.identity, img_hash) if img_hash else None
            inv_folder = cache.locate("inversion", inv) if inv else None
            if inv_folder is None:  # the images are made only to learn C* (cell.image_set_ref)
                cached = bool(ikey) and cache.locate("image_sets", ikey) is not None
                p.artifacts.append((f"C* image set ({img_hash})", cached))
                if not cached:
                    p.images += int(spec["n_images"] or 0)
                    p.sampling_steps += int(spec["n_images"] or 0) * steps
            if inv:
                p.artifacts.append((f"C* on {checkpoint_for_inversion(cfg).get('method')} "
                                    f"beta={checkpoint_for_inversion(cfg).get('beta')} ({config_hash(inv)})",
                                    inv_folder is not None))  # fmt: skip
                n_inv = int(cfg.inversion.steps)
                if inv_folder is None:
                    p.train_steps += n_inv
                else:
                    p.train_steps_cached += n_inv
                    from unlearn_exp.store import file_sha256

                    concept_id = f"{cfg.embedding.source}:{file_sha256(inv_folder / 'learned_embeds.safetensors')[:16]}"
        else:
            p.notes.append(f"C* from inversion.image_set.source={spec['source']}: counted when built")
            p.train_steps += int(cfg.inversion.steps)

    # images: benchmark, benign PP prompts, the original model's references
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
            p.images += n * int(bench_cfg.get("images_per_prompt") or 1)
            p.sampling_steps += n * int(bench_cfg.get("images_per_prompt") or 1) * steps
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
            if ident is None:  # C* not built yet: these images cannot be cached
                p.images += len(rows)
                p.sampling_steps += len(rows) * steps
                continue
            for start in range(0, len(rows), size):
                part = rows[start : start + size]
                key = {**ident, "sampling": settings, "rows": _rows_identity(part)}
                if cache.locate("samples", key) is not None:
                    p.images_cached += len(part)
                else:
                    p.images += len(part)
                    p.sampling_steps += len(part) * steps
    return p


def _local_data_dir(bench_cfg, data_dir) -> str | None:
    """``data_dir`` where the benchmark's pinned download is already there, else None (no download)."""
    from unlearn_exp.data import pinned_download_path

    if bench_cfg.get("path") or not bench_cfg.get("url"):
        return data_dir
    return data_dir if pinned_download_path(bench_cfg, data_dir).is_file() else None


def _cell_identity(cfg, model: _Model, checkpoint_id, concept_id: str, original: dict) -> dict | None:
    """The sample identity of the cell's own images, where it can be known before building."""
    from unlearn_exp.guidance import Concept, make_guidance

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
    tokens = [str(cfg.inversion.placeholder)] if learned else []
    concept = Concept(str(cfg.embedding.source) if learned else "explicit", tokens, concept_id)
    scale = 1.0
    if cfg.sampling.scale_step_counts:
        scale = int(cfg.sampling.steps) / int(cfg.sampling.reference_steps)
    guidance = make_guidance(cfg.guidance, cfg.task, concept, step_scale=scale)
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


def _estimate(p: CellPlan, calib: dict[str, Any] | None, model_name: str) -> float | None:
    c = (calib or {}).get(model_name)
    if not c:
        return None
    return p.sampling_steps * float(c["s_per_image_step"]) + p.train_steps * float(c["s_per_train_step"])


def calibrate(cfg, path: Path) -> dict[str, Any]:
    """Measure seconds per image per sampling step and per training step for ``cfg.model`` here."""
    import torch

    from unlearn_exp.models import load_model
    from unlearn_exp.sampling import sample

    comps = load_model(cfg.model)
    n, steps = 4, 4
    with torch.no_grad():
        sample(comps, ["a photo"] * 2, [0, 1], steps=2)  # warm-up
        t = time.time()
        sample(comps, ["a photo"] * n, list(range(n)), steps=steps)
        per_image_step = (time.time() - t) / (n * steps)
    unet = comps.unet.train().requires_grad_(True)
    x = torch.randn(1, *comps.latent_shape(), device=comps.device, dtype=comps.dtype)
    e, _ = comps.encode_prompts(["a photo"])
    t = time.time()
    for _ in range(3):
        loss = unet(x, torch.tensor([10], device=comps.device), encoder_hidden_states=e).sample.pow(2).mean()
        loss.backward()
    per_train = (time.time() - t) / 3
    unet.eval().requires_grad_(False)
    table = {}
    if path.is_file():
        table = json.loads(path.read_text())
    table[str(cfg.model.name)] = {
        "s_per_image_step": per_image_step,
        "s_per_train_step": per_train,
        "measured": time.strftime("%Y-%m-%d %H:%M"),
        "device": str(comps.device),
    }
    from unlearn_exp.store import atomic_write_json

    atomic_write_json(path, table)
    return table


def plan(overrides: list[str]) -> tuple[list[CellPlan], Any]:
    from unlearn_exp.demo import _compose, grid

    base = list(overrides)
    try:
        cells = grid(base)
    except Exception:  # no sweep in the config: the one cell the overrides describe
        cells = [[]]
    first = _compose([*base, *cells[0]])
    done = _done_spec_keys(Path(first.paths.results_dir))
    return [plan_cell(_compose([*base, *c]), c, done) for c in cells], first


def render(plans: list[CellPlan], calib: dict | None, model_name: str) -> str:
    lines = []
    total_est = 0.0
    for i, p in enumerate(plans, 1):
        est = _estimate(p, calib, model_name)
        total_est += est or 0.0
        status = "done" if p.done else "to run"
        need = ", ".join(f"{w} [{'cached' if c else 'build'}]" for w, c in p.artifacts) or "-"
        lines.append(
            f"[{i:2d}/{len(plans)}] {' '.join(p.overrides) or '(one cell)'}: {status}; images to sample "
            f"{p.images} ({p.images_cached} cached), training steps {p.train_steps} ({p.train_steps_cached} cached)"
            + (f", about {est / 60:.1f} min" if est is not None else "")
        )
        lines.append(f"        needs: {need}")
        lines += [f"        note: {n}" for n in p.notes]
    images = sum(p.images for p in plans)
    cached = sum(p.images_cached for p in plans)
    steps = sum(p.train_steps for p in plans)
    steps_cached = sum(p.train_steps_cached for p in plans)
    work = images + cached + steps + steps_cached
    share = (cached + steps_cached) / work if work else 1.0
    lines.append(
        f"total: {len(plans)} cells ({sum(p.done for p in plans)} done), {images} images to sample, "
        f"{steps} training steps; the cache saves {share:.0%} of the work ({cached} images, {steps_cached} steps)"
    )
    if calib and calib.get(model_name):
        lines.append(f"estimated time: {total_est / 60:.1f} min on this machine ({calibration_path()})")
    else:
        lines.append(
            f"no calibration for model '{model_name}': `python -m unlearn_exp.plan --calibrate ...` measures it"
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
        if args.calibrate:
            calibrate(cfg, calibration_path())
        calib = json.loads(calibration_path().read_text()) if calibration_path().is_file() else None
        print(render(plans, calib, str(cfg.model.name)))
        return 0

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
