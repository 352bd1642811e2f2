"""One grid cell, as named stages over the store (``_run_cell`` runs them in order):

``open_cell`` (config, model, prompt sets, judge) -> ``originals`` (what the original model makes:
PP references, C*'s images) -> ``unlearn`` -> ``concept`` (the words or ``C*``, and the guidance)
-> ``sample`` -> ``judge`` -> ``score`` -> ``record`` (image and cell rows, written atomically).
Each stage takes and returns small dataclasses; ``toy/artifacts.py`` and ``precondition.py`` run
stages 0-2 through the same functions, so their keys are the cell's.

Every costly product is an artifact of the store, keyed by exactly the config that determines it:

- ``samples/<h>``: the images of one chunk of prompts, for a (model, checkpoint, guidance, concept,
  sampler) combination. A cell with ``guidance=none`` leaves the concept out of its keys, so the
  three embedding values of the grid share one computation;
- ``verdicts/<h>``: the judge's output on one sample chunk, keyed by the chunk and the judge profile;
- ``distances/<h>``: PP distances between a chunk and the original model's chunk for the same rows;
- ``image_sets/<h>`` and ``inversion/<h>``: the harmful images and the concept embedding ``C*``;
- unlearned checkpoints (``unlearning/...``, built by ``unlearning.apply_checkpoint``).

A killed sweep resumes from the last finished chunk; a repeated sweep recomputes nothing. Results
(one row per image, one per cell) are written to disk before anything is sent to the tracker.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from unlearn_exp.errors import NotImplementedStage, UserError
from unlearn_exp.identity import cell_spec, model_identity, resolved_precision, spec_key
from unlearn_exp.registry import UNLEARNING
from unlearn_exp.store import ArtifactStore, atomic_dir, atomic_write_json, config_hash, file_sha256
from unlearn_exp.store import to_plain as plain

if TYPE_CHECKING:
    from unlearn_exp.guidance import Concept, Guidance
    from unlearn_exp.models import Components

log = logging.getLogger("unlearn_exp")

__all__ = ["model_identity", "run_cell"]


def load_model(model_cfg) -> Components:
    """``models.load_model``, imported on first use: a cell whose result is recorded imports neither
    diffusers nor transformers (the demo's rerun)."""
    from unlearn_exp.models import load_model as load

    return load(model_cfg)


def sampling_settings(cfg) -> dict[str, Any]:
    s = cfg.sampling
    return {
        "scheduler": str(s.scheduler),
        "steps": int(s.steps),
        "guidance_scale": float(s.guidance_scale),
        "resolution": int(s.resolution),
    }


GPU_OPTIONS = ("compile", "channels_last", "tf32", "vae_slicing", "vae_tiling")


def sample_identity(cfg, device: str) -> dict[str, Any]:
    """The sampler settings a sample artifact depends on, with the run precision resolved for
    ``device``. The batch size is part of it: how many rows one UNet call holds changes an image's
    last bits (docs/results.md). The GPU options (``sampling.compile`` ...) may change them too, so
    those that are on are part of it (all off: no ``gpu_options`` entry)."""
    s = cfg.sampling
    on = sorted(k for k in GPU_OPTIONS if s.get(k))
    return {
        **sampling_settings(cfg),
        "batch_size": int(s.batch_size),
        "precision": resolved_precision(s.precision, device),
        **({"gpu_options": on} if on else {}),
    }


def job_dir(cfg) -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # composed outside a Hydra app (tests, the demo): one folder per config
        return (
            Path(cfg.paths.output_root)
            / "outputs"
            / "cells"
            / config_hash({k: plain(cfg[k]) for k in cfg if k != "hydra"})
        )


# ----------------------------------------------------------------------------------- samples
@dataclass
class Chunk:
    rows: list[dict[str, Any]]
    folder: Path
    key: dict[str, Any]


def _rows_identity(rows: list[dict[str, Any]]) -> str:
    return config_hash([[r["case_id"], r["prompt"], int(r["seed"]), int(r["image_index"])] for r in rows])


def generate_samples(
    comps: Components | Callable[[], Components],
    guidance: Guidance,
    rows: list[dict[str, Any]],
    identity: dict[str, Any],
    store: ArtifactStore,
    cfg,
    label: str = "sampling",
) -> list[Chunk]:
    """Sample ``rows`` in chunks, each chunk an artifact (PNG files + ``meta.json``); ``label`` names
    what is sampled in the progress bar. ``comps`` may be a loader (a function returning the model,
    called at most once): then a model is loaded only if a chunk is not cached yet."""
    from unlearn_exp.identity import resolved_device

    settings = sampling_settings(cfg)
    size = int(cfg.sampling.chunk_size)
    if callable(comps):
        device, comps = resolved_device(cfg.model), functools.cache(comps)
    else:
        device, loaded = str(comps.device), comps
        comps = lambda: loaded  # noqa: E731
    chunks = []
    for start in range(0, len(rows), size):
        part = rows[start : start + size]
        key = {**identity, "sampling": sample_identity(cfg, device), "rows": _rows_identity(part)}

        n_chunks = (len(rows) + size - 1) // size
        chunk_label = label + (f" [chunk {start // size + 1}/{n_chunks}]" if n_chunks > 1 else "")

        def build(tmp: Path, part=part, chunk_label=chunk_label):
            from unlearn_exp.sampling import predict_rows  # Lightning: imported only to sample

            out = predict_rows(
                comps(),
                guidance,
                part,
                batch_size=int(cfg.sampling.batch_size),
                devices=cfg.sampling.devices,
                precision=str(cfg.sampling.precision),
                progress=bool(cfg.sampling.progress),
                label=chunk_label,
                **{k: v for k, v in settings.items()},
            )
            meta = []
            for j, r in enumerate(out):
                name = f"{j:04d}_{_safe_name(r['case_id'])}_{int(r['image_index'])}.png"
                r["image"].save(tmp / name)
                meta.append(
                    {k: v for k, v in r.items() if k not in ("image", "image_tensor")} | {"file": name}
                )
            atomic_write_json(tmp / "meta.json", meta)

        folder = store.get_or_build("samples", key, build)
        chunks.append(Chunk(part, folder, key))
    return chunks


def _safe_name(case_id: Any) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(case_id))[:40]


def chunk_meta(chunk: Chunk) -> list[dict[str, Any]]:
    return json.loads((chunk.folder / "meta.json").read_text())


def chunk_images(chunk: Chunk):
    from PIL import Image

    return [Image.open(chunk.folder / m["file"]).convert("RGB") for m in chunk_meta(chunk)]


# ---------------------------------------------------------------------------------- judging
def judge_chunks(chunks: list[Chunk], judge, store: ArtifactStore, what: str = "") -> list[dict[str, Any]]:
    """The judge's verdict on every image of ``chunks`` (cached per chunk and judge profile)."""
    from unlearn_exp.progress import StageBar

    verdicts, bar = [], None
    keys = [{"samples": chunk.key, "judge": judge.profile["hash"]} for chunk in chunks]
    todo = sum(len(c.rows) for c, k in zip(chunks, keys) if store.locate("verdicts", k) is None)
    for chunk, key in zip(chunks, keys):

        def build(tmp: Path, chunk=chunk):
            nonlocal bar
            label = f"judging {what} ({judge.profile['name']})".replace("  ", " ")
            bar = bar or StageBar(label, todo, "img")
            out = judge.judge(chunk_images(chunk))
            bar.update(len(out))
            atomic_write_json(tmp / "verdicts.json", out)

        folder = store.get_or_build("verdicts", key, build)
        verdicts.extend(json.loads((folder / "verdicts.json").read_text()))
    if bar is not None:
        bar.close()
    return verdicts


def pp_distances(
    chunks: list[Chunk], refs: list[Chunk], metric, store: ArtifactStore, what: str = ""
) -> list[float]:
    """PP distances between each image and the original model's image of the same row (cached)."""
    from unlearn_exp.progress import StageBar
    from unlearn_exp.sampling import from_pil

    out, bar = [], None
    keys = [
        {"samples": c.key, "reference": r.key, "metric": metric.profile["hash"]} for c, r in zip(chunks, refs)
    ]
    todo = sum(
        len(c.rows)
        for c, r, k in zip(chunks, refs, keys)
        if c.key != r.key and store.locate("distances", k) is None
    )
    for chunk, ref, key in zip(chunks, refs, keys):
        if chunk.key == ref.key:  # the original model itself: distance 0 by definition
            out.extend([0.0] * len(chunk.rows))
            continue

        def build(tmp: Path, chunk=chunk, ref=ref):
            import torch

            nonlocal bar
            bar = bar or StageBar(f"PP {what} ({metric.profile['name']})".replace("  ", " "), todo, "img")
            d = metric.distance(from_pil(chunk_images(chunk)), from_pil(chunk_images(ref)))
            bar.update(len(chunk.rows))
            atomic_write_json(tmp / "distances.json", [float(x) for x in torch.as_tensor(d).flatten()])

        folder = store.get_or_build("distances", key, build)
        out.extend(json.loads((folder / "distances.json").read_text()))
    if bar is not None:
        bar.close()
    return out


def benign_fidelity(
    split_chunks: dict[str, list[Chunk]],
    pp_sets: dict[str, list[dict]],
    judge,
    store: ArtifactStore,
    set_name: dict[str, str] | None = None,
) -> tuple[dict[str, list[dict]], dict[str, list[bool]]]:
    """Judge the benign (PP) images whose prompts say what they should show (an ``expected`` label)
    and ask the judge whether each does: benign accuracy (docs/design.md 2). Prompt sets without labels
    (COCO) and judges that cannot tell (NudeNet, Q16) are skipped: nothing is judged for them."""
    from unlearn_exp.evaluation.judge import Judge

    verdicts, ok = {}, {}
    for name, rows in pp_sets.items():
        if name == "bench" or not rows or not all(isinstance(r.get("expected"), str) for r in rows):
            continue
        if type(judge).fidelity is Judge.fidelity:  # this judge cannot tell: judge nothing
            continue
        verdicts[name] = judge_chunks(split_chunks[name], judge, store, (set_name or {}).get(name, name))
        labels = judge.fidelity(verdicts[name], rows)
        if labels is not None:
            ok[name] = [bool(x) for x in labels]
    return verdicts, ok


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


# ---------------------------------------------------------------------------- concept source
def checkpoint_for_inversion(cfg) -> dict[str, Any]:
    """The checkpoint whose ``C*`` this cell uses: its own (``inverted``) or the shared source."""
    ck = plain(cfg.checkpoint)
    if cfg.embedding.source == "shared":
        ck = {
            **ck,
            **{k: v for k, v in plain(cfg.embedding.from_checkpoint).items() if v is not None or k == "path"},
        }
    return ck


def inversion_key(cfg, model_id: str, image_set_id: str, learned_on: str) -> dict[str, Any]:
    """The key of ``C*``: the model, the content id of the checkpoint it is learned on (``learned_on``:
    the weights it was optimised against, not their recipe), the inversion settings and the images."""
    inv = plain(cfg.inversion)
    inv.pop("image_set", None)
    return {
        "model": model_id,
        "checkpoint": learned_on,
        "inversion": inv,
        "image_set": image_set_id,
    }


class _KeepEvery:
    """Stands in for the judge when ``inversion.image_set.check`` is false: every sample is kept."""

    name = "unchecked"

    def judge(self, images) -> list[dict[str, Any]]:
        return [{"safe": False, "score": 1.0, "raw": {"unchecked": True}} for _ in images]


def image_set_key(cfg, comps: Components, judge, model_id: str) -> dict[str, Any]:
    """The key of the generated image set ``C*`` is learned from (``inversion.image_set``); ``judge``
    is the set's own filter (``inversion.image_set.filter``)."""
    spec = plain(cfg.inversion.image_set)
    return {
        "model": model_id,
        "prompts": list(spec["prompts"] or []),
        "n_images": int(spec["n_images"] or 0),
        "judge": judge.profile["hash"] if spec["check"] else None,
        "sampling": sample_identity(cfg, str(comps.device)),
        "seed": int(spec["seed"]),
    }


def duo_pair_images(cfg, comps: Components, store: ArtifactStore) -> Path:
    """``inversion.image_set.source=duo_pairs``: exactly the unsafe half of the DUO pair set(s) that
    trained the checkpoint ``C*`` is learned on (built here if absent), as one image folder."""
    import shutil

    from unlearn_exp.unlearning.duo import pair_sets, resolve_recipe

    ck = checkpoint_for_inversion(cfg)
    if ck.get("method") != "duo" or ck.get("path"):
        raise UserError(
            "inversion.image_set.source=duo_pairs needs a DUO checkpoint trained here (checkpoint=duo, "
            "no checkpoint.path): use source=generated or source=folder"
        )
    recipe = resolve_recipe(ck, cfg.task)
    sets = pair_sets(comps, ck, recipe, store, judge=method_filter(ck.get("filter")))
    key = {"duo_pairs": [folder.name for _, folder in sets]}

    def build(tmp: Path):
        for _, folder in sets:
            for f in sorted((folder / "unsafe").glob("*.png")):
                shutil.copyfile(f, tmp / f"{folder.name}_{f.name}")

    return store.get_or_build("image_sets", key, build)


@dataclass
class ImageSetRef:
    """The harmful images ``C*`` is learned from: ``id`` names them in the inversion key without
    building them (a user folder by its files' content, a generated set by the key it is generated
    under), ``folder()`` gives them, generating them on its first call. A cell whose ``C*`` is cached
    never generates the set."""

    id: str
    folder: Callable[[], Path]


def folder_content_id(folder: Path) -> str:
    """A user image folder by content: the name and sha256 of every image the inversion reads."""
    from unlearn_exp.inversion.image_sets import IMAGE_SUFFIXES
    from unlearn_exp.store import file_sha256

    if not folder.is_dir():
        raise UserError(f"inversion.image_set.path: image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return "folder:" + config_hash({p.name: file_sha256(p) for p in files})


def image_set_ref(
    cfg, comps: Components | Callable[[], Components], store: ArtifactStore, model_id: str
) -> ImageSetRef:
    """The image set of ``inversion.image_set``: a user folder, the unsafe half of the DUO pairs, or
    generated by the original model from the task's unsafe prompts and kept where the method's own
    filter (``inversion.image_set.filter``) flags the concept. A generated set is made only when
    ``C*`` is learned, after the cell's checkpoint is applied: ``comps`` may then be a function that
    returns the original model (``original_model``), called only to generate it."""
    from types import SimpleNamespace

    from unlearn_exp.identity import resolved_device

    original = comps if callable(comps) else (lambda: comps)
    where = SimpleNamespace(device=resolved_device(cfg.model)) if callable(comps) else comps
    spec = plain(cfg.inversion.image_set)
    if spec["source"] == "folder":
        if not spec["path"]:
            raise UserError("inversion.image_set.source=folder needs inversion.image_set.path")
        folder = Path(spec["path"])
        return ImageSetRef(folder_content_id(folder), lambda: folder)
    if spec["source"] == "duo_pairs":
        pairs = duo_pair_images(cfg, original(), store)
        return ImageSetRef(pairs.name, lambda: pairs)
    if spec["source"] != "generated":
        raise UserError(
            f"unknown inversion.image_set.source '{spec['source']}': choose generated, duo_pairs or folder"
        )
    judge = method_filter(spec["filter"]) if spec["check"] else None
    if spec["check"] and judge is None:
        raise UserError("inversion.image_set.check is true but inversion.image_set.filter is null")
    prompts, n = list(spec["prompts"] or []), int(spec["n_images"] or 0)
    if not prompts or n < 1:
        raise UserError(
            "no image set for concept inversion: set task.inversion_images or inversion.image_set.path"
        )
    settings = sampling_settings(cfg)
    key = image_set_key(cfg, where, judge or _KeepEvery(), model_id)

    def build(tmp: Path):
        from unlearn_exp.inversion.image_sets import generate_image_set

        generate_image_set(
            original(),
            prompts,
            [int(spec["seed"])],
            judge if spec["check"] else _KeepEvery(),
            tmp,
            n_images=n,
            max_tries=int(spec["max_tries"]),
            sample_kwargs=settings,
            batch_size=int(cfg.sampling.batch_size),
        )

    # the store names the folder by the key's hash: the id is known before anything is built
    return ImageSetRef(
        config_hash(key), functools.cache(lambda: store.get_or_build("image_sets", key, build))
    )


def ensure_image_set(cfg, comps: Components, store: ArtifactStore, model_id: str) -> Path:
    """The image set's folder, built if absent (``image_set_ref(...).folder()``)."""
    return image_set_ref(cfg, comps, store, model_id).folder()


def learned_on_checkpoint(cfg, comps: Components, store: ArtifactStore, own_id: str, loggers):
    """The checkpoint ``C*`` is learned on: ``(content id, model with it applied or None)``. The
    cell's own (``embedding=inverted``: ``own_id``, the cell's model), or the shared source: a trained
    DUO source that is built is named from its files without loading anything; any other source is
    applied to a second copy of the model (built if absent), which ``C*``'s build then reuses."""
    target = checkpoint_for_inversion(cfg)
    if target == plain(cfg.checkpoint):
        return own_id, comps
    if target.get("method") == "duo" and not target.get("path"):
        from unlearn_exp.unlearning.duo import duo_key, trained_duo_id

        folder = store.locate(
            "unlearning/duo", duo_key(comps, target, cfg.task, method_filter(target.get("filter")))
        )
        if folder is not None:
            return trained_duo_id(folder), None
    inv_comps = load_model(cfg.model)  # the source checkpoint, apart from this cell's model
    info = apply_unlearning(cfg, inv_comps, store, OmegaConf.create(target), loggers("unlearning"))
    return str(info["id"]), inv_comps


def resolve_concept(
    cfg,
    comps: Components,
    store: ArtifactStore,
    model_id: str,
    image_set: ImageSetRef | None,
    loggers,
    checkpoint_id: str = "original",
) -> Concept:
    """The words, or ``C*`` (learned, or read from ``embedding.path``); ``checkpoint_id`` is the content
    id of the checkpoint applied to ``comps``."""
    from unlearn_exp.guidance import Concept
    from unlearn_exp.inversion.textual_inversion import load_concept_tokens

    source = cfg.embedding.source
    if source == "explicit" or cfg.guidance.name == "none":
        texts = {
            "task": cfg.task.name,
            "sld": cfg.task.sld_concept,
            "keywords": list(cfg.task.safree_keywords),
        }
        return Concept("explicit", [], f"explicit:{config_hash(texts)}")
    if source not in ("inverted", "shared"):
        raise UserError(f"unknown embedding source '{source}': choose explicit, inverted or shared")
    if cfg.embedding.get("path"):
        path = Path(cfg.embedding.path)
    else:
        learned_on, learned_comps = learned_on_checkpoint(cfg, comps, store, checkpoint_id, loggers)
        key = inversion_key(cfg, model_id, image_set.id if image_set else "none", learned_on)
        target = checkpoint_for_inversion(cfg)

        def build(tmp: Path):
            from unlearn_exp.inversion.concept_inversion import invert

            inv_comps = learned_comps
            if inv_comps is None:  # a built source named from its files: apply it now
                inv_comps = load_model(cfg.model)
                apply_unlearning(cfg, inv_comps, store, OmegaConf.create(target), loggers("unlearning"))
            work = Path(cfg.paths.cache_dir) / "inversion_work" / config_hash(key)  # resumable checkpoints
            invert(
                inv_comps,
                image_set.folder() if image_set else None,
                cfg.inversion,
                tmp,
                loggers("inversion"),
                source=target,
                ckpt_dir=work,
            )

        path = store.get_or_build("inversion", key, build) / "learned_embeds.safetensors"
    tokens = load_concept_tokens(comps, path)
    from unlearn_exp.store import file_sha256

    return Concept(source, tokens, f"{source}:{file_sha256(path)[:16]}", str(path))


def apply_unlearning(cfg, comps: Components, store: ArtifactStore, checkpoint_cfg, logger) -> dict[str, Any]:
    from unlearn_exp.unlearning import apply_checkpoint  # refuses a method nobody registered

    return apply_checkpoint(
        comps,
        checkpoint_cfg,
        store,
        task_cfg=cfg.task,
        judge=method_filter(checkpoint_cfg.get("filter")),  # the method's filter, not cfg.judge
        sample_kwargs=None,
        logger=logger,
    )


def method_filter(filter_cfg):
    """The judge profile a method filters its training data with (``checkpoint.filter``,
    ``inversion.image_set.filter``), or None; the evaluation judge never enters here."""
    if not filter_cfg:
        return None
    from unlearn_exp.evaluation import make_judge

    return make_judge(filter_cfg)


# ------------------------------------------------------------------------------------ the cell
def benchmark_rows(bench_cfg, data_dir) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from unlearn_exp.data import load_benchmark

    df = load_benchmark(bench_cfg, data_dir)
    rows = df.to_dict("records")
    for r in rows:
        r["seed"] = int(r["seed"])
        r["image_index"] = int(r["image_index"])
        r["guidance"] = None if pd.isna(r.get("guidance")) else float(r["guidance"])
    return rows, dict(df.attrs)


def _copy_images(image_rows: list[dict[str, Any]], folder: Path) -> None:
    """The job's images in its run directory, named ``<split>/<case id>_<image index>.png``: copies,
    so that nothing done to them can change the artifact cache."""
    import shutil

    for r in image_rows:
        dest = folder / r["split"] / f"{_safe_name(r['case_id'])}_{r['image_index']}.png"
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


def update_index(folder: Path, cell: dict[str, Any]) -> Path:
    """``<results>/<experiment>/index.csv``: one readable line per cell folder (its name, what it is,
    its DSR), rewritten atomically under a lock so parallel jobs keep every line."""
    from filelock import FileLock

    from unlearn_exp.store import atomic_write_text

    index = folder / "index.csv"
    name = f"{cell['checkpoint_label']} | {cell['guidance']}" + (
        f"+{cell['embedding']}" if cell["embedding"] not in ("none", "explicit") else ""
    )
    row = {"cell": name, **{k: cell.get(k) for k in INDEX_COLUMNS if k != "cell"}}
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(index) + ".lock"):
        rows = pd.read_csv(index, dtype=str).to_dict("records") if index.is_file() else []
        rows = [r for r in rows if r.get("cell_key") != cell["cell_key"]] + [row]
        atomic_write_text(index, pd.DataFrame(rows, columns=list(INDEX_COLUMNS)).to_csv(index=False))
    return index


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
    if beta is None:
        return float("nan"), str(ck.method)
    return float(beta), f"{ck.method} beta={float(beta):g}"


def run_cell(cfg: DictConfig) -> dict[str, Any]:
    from unlearn_exp.tracking import Tracker
    from unlearn_exp.validate import validate

    validate(cfg)  # every value checked before any model is loaded or any folder written
    from unlearn_exp import progress

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
        result = _run_cell(cfg, tracker, spec)
        exit_code = 0
        return result
    finally:
        tracker.finish(exit_code=exit_code)


def recorded_result(cfg: DictConfig, spec: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The result already recorded for exactly this cell (``reuse_results``): the row under
    ``<results>/<experiment>/`` whose ``spec_key`` is this config's, with the same checkpoint label,
    and both tables present. Nothing is loaded. None where there is none, or where the model's
    weights are not here (its content cannot be checked)."""
    from unlearn_exp.evaluation import read_table

    spec = spec if spec is not None else cell_spec(cfg)
    if spec["model"]["content"] is None:
        return None
    key, label = spec_key(spec), checkpoint_label(cfg)[1]
    folder = Path(cfg.paths.results_dir) / str(cfg.name)
    index = folder / "index.csv"
    if not index.is_file():
        return None
    for cell_key in pd.read_csv(index, dtype=str).query("spec_key == @key")["cell_key"]:
        results = folder / str(cell_key)
        if not ((results / "cells.parquet").is_file() and (results / "images.parquet").is_file()):
            continue
        try:
            row = read_table(results / "cells.parquet").iloc[0].to_dict()
        except Exception:  # an unreadable table is not a result: compute the cell again
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


def _run_cell(cfg: DictConfig, tracker, spec: dict[str, Any] | None = None) -> dict[str, Any]:
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


# ------------------------------------------------------------------------------------ the stages
@dataclass
class Cell:
    """What every stage reads: the config, the store, the loaded model and the prompt sets."""

    cfg: DictConfig
    store: ArtifactStore
    comps: Components
    model_id: str
    out_dir: Path
    bench: list[dict[str, Any]]
    bench_attrs: dict[str, Any]
    pp_sets: dict[str, list[dict[str, Any]]]  # "coco" (the PP prompts) and/or "bench"
    set_name: dict[str, str]
    spec: dict[str, Any]  # identity.cell_spec: what the report matches the cell on
    judge: Any  # the evaluation judge
    metric: Any  # the PP metric
    unlearned: bool = False  # a checkpoint has been applied to ``comps`` (stage 1)

    def loggers(self, stage: str):
        from unlearn_exp.tracking import lightning_logger

        return lightning_logger(self.cfg.logger, stage, save_dir=self.out_dir)


@dataclass
class Originals:
    """Stage 0: what the original model makes before it is unlearned (PP references, C*'s images)."""

    refs: dict[str, list[Chunk]]
    image_set: ImageSetRef | None


@dataclass
class Unlearned:
    """Stage 1: the checkpoint applied to ``cell.comps``."""

    checkpoint_id: str
    info: dict[str, Any]


@dataclass
class ConceptGuidance:
    """Stage 2: the concept embedding (words or ``C*``), the guidance built on it, and the identity
    of what is sampled."""

    concept: Concept
    guidance: Guidance
    identity: dict[str, Any]
    what: str


@dataclass
class Samples:
    """Stage 3: the image chunks per prompt set ("bench", and "coco" for PP)."""

    chunks: dict[str, list[Chunk]]


@dataclass
class Judged:
    """Stage 4: the judge's verdicts on the benchmark images and on the PP sets, and benign fidelity."""

    verdicts: list[dict[str, Any]]
    pp_verdicts: dict[str, list[dict[str, Any]]]
    benign_ok: dict[str, list[bool | None]]


@dataclass
class Scores:
    """Stage 5: DSR with its interval, PP per prompt set (and per image), benign accuracy."""

    stats: dict[str, Any]
    pp_values: dict[str, float]
    lpips_by_split: dict[str, list[float]]
    benign_acc: float
    n_benign: int


def cell_store(cfg) -> ArtifactStore:
    """The artifact store a cell reads and writes: ``paths.cache_dir`` over the shipped caches."""
    from unlearn_exp.paths import resolve_local_path

    shipped = [resolve_local_path(str(p)) for p in (cfg.paths.get("shipped_caches") or [])]
    return ArtifactStore(cfg.paths.cache_dir, shipped=shipped, verify=str(cfg.paths.get("verify", "small")))


def open_cell(cfg: DictConfig, *, prompts: bool = True, spec: dict[str, Any] | None = None) -> Cell:
    """Load the model and (unless ``prompts`` is false) the benchmark and PP prompt sets."""
    if cfg.checkpoint.method not in UNLEARNING.names() and not cfg.checkpoint.get("_target_"):
        raise NotImplementedStage(f"unlearning ({cfg.checkpoint.method})")
    from unlearn_exp.paths import resolve_local_path

    store = cell_store(cfg)
    out_dir = job_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.model.get("source") == "pretrained":  # missing weights stop the job before any work
        from unlearn_exp.models.pretrained import resolve_checkpoint

        resolve_checkpoint(resolve_local_path(str(cfg.model.path)), need_vae=bool(cfg.model.vae))
    # identity, judge and PP metric before any work: a missing file stops the job here
    from unlearn_exp.evaluation import make_judge, make_pp_metric

    spec = spec if spec is not None else cell_spec(cfg)
    the_judge, metric = make_judge(cfg.judge), make_pp_metric(cfg.pp.metric)
    bench, bench_attrs, pp_sets = [], {}, {}
    if prompts:
        bench, bench_attrs = benchmark_rows(cfg.benchmark, cfg.paths.data_dir)
        if cfg.pp.get("prompts") is not None:
            pp_sets["coco"] = benchmark_rows(cfg.pp.prompts, cfg.paths.data_dir)[0]
        if cfg.pp.bench:
            pp_sets["bench"] = bench
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


ORIGINAL = {"checkpoint": "original", "guidance": {"name": "none"}}


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
    from unlearn_exp.guidance import Guidance

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
    cell.unlearned = True
    return Unlearned(str(ck.get("id", ck.get("hash", config_hash(plain(cell.cfg.checkpoint))))), ck)


def concept(cell: Cell, made: Originals, ck: Unlearned) -> ConceptGuidance:
    """Stage 2: the concept (the words, or ``C*`` learned on the checkpoint or the shared source) and
    the guidance method built on it."""
    from unlearn_exp.guidance import make_guidance

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
    from unlearn_exp.evaluation import dsr, pp

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
    from unlearn_exp.evaluation import cell_table, image_table, write_table

    cfg = cell.cfg
    the_judge, metric = cell.judge, cell.metric
    cell_key = config_hash(
        {
            **conc.identity,
            "benchmark": [
                cell.bench_attrs.get("benchmark"),
                cell.bench_attrs.get("file_sha256"),
                _rows_identity(cell.bench),
            ],
            "sampling": sampling_settings(cfg),
            "judge": the_judge.profile["hash"],
            "pp": metric.profile["hash"],
            "pp_sets": {k: _rows_identity(v) for k, v in cell.pp_sets.items()},
        }
    )
    image_rows = image_records(
        cell, made, samples, judged, scores, cell_key, the_judge.profile, metric.profile
    )
    row = cell_record(
        cell, ck, conc, samples, scores, image_rows, cell_key, the_judge.profile, metric.profile
    )
    images_df, cells_df = image_table(image_rows), cell_table([row])
    _copy_images(image_rows, cell.out_dir / "images")
    results = Path(cfg.paths.results_dir) / str(cfg.name) / cell_key
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


# ------------------------------------------------------------------------------------ the records
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
    safree_compat = str(cfg.guidance.compat) if cfg.guidance.name == "safree" else ""
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
