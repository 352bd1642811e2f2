"""Applying a ``conf/checkpoint/*`` config to a model: train (cached) or load published weights.

``apply_checkpoint`` mutates ``comps`` in place and returns the checkpoint's identity. With
``path`` null the weights are trained through the artifact store (``unlearning/<method>``), keyed by
the recipe, the base model's identity and the task, so a sweep trains each checkpoint once. With
``path`` set the user's file(s) are checked against the model and loaded:

- ``duo``: LoRA file(s) for ``load_lora_weights`` (several with ``adapter_weights``, docs/methods.md 5.5);
- ``esd``: a full or partial UNet state dict (diffusers names, or a complete CompVis/LDM UNet);
- ``uce``: edited weights of the maps that read the text (SD v1: ``attn2.to_k``/``attn2.to_v``;
  SD3: ``context_embedder`` and ``time_text_embed.text_embedder.linear_1``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from unlearn_exp.atomic import atomic_write_json
from unlearn_exp.errors import NotImplementedStage, UserError
from unlearn_exp.hashing import file_sha256
from unlearn_exp.hashing import to_plain as _plain
from unlearn_exp.models.components import Components
from unlearn_exp.registry import UNLEARNING
from unlearn_exp.store import ArtifactStore
from unlearn_exp.unlearning.config import (
    ESDCheckpointConfig,
    UCECheckpointConfig,
)
from unlearn_exp.unlearning.uce import TEXT_READERS, is_text_reader_weight
from unlearn_exp.unlearning.weights import load_unet_weights, read_safetensors, resolve_weight_file

USER_KEYS = ("path", "allow_pickle_conversion", "adapter_weights")


def _store(store) -> ArtifactStore:
    return store if isinstance(store, ArtifactStore) else ArtifactStore(store)


def _task(task_cfg) -> dict[str, Any]:
    return dict(_plain(task_cfg) or {})


def _per_task(cfg: dict[str, Any], key: str, task: dict[str, Any], fallback=None):
    """``cfg[key]`` may be a value or a mapping task name -> value; the task config may override it."""
    if task.get(f"{cfg['method']}_{key}") is not None:
        return task[f"{cfg['method']}_{key}"]
    value = cfg.get(key)
    if isinstance(value, dict):
        value = value.get(task.get("name"))
    return fallback if value is None else value


def _load_user_unet_weights(
    comps: Components, cfg: dict[str, Any], store, method: str, only_text_readers: bool
) -> dict:
    paths = cfg["path"] if isinstance(cfg["path"], list) else [cfg["path"]]
    if len(paths) != 1:
        raise UserError(f"checkpoint.path for {method} must be one file, got {len(paths)}")
    f = resolve_weight_file(paths[0], store, allow_pickle_conversion=bool(cfg["allow_pickle_conversion"]))
    tensors = read_safetensors(f, f"{method} checkpoint '{f.name}'")
    if only_text_readers:  # UCE: the weights of the maps that read the text, nothing else
        tensors = {k: v for k, v in tensors.items() if not k.endswith("num_batches_tracked")}
        other = [k for k in tensors if not is_text_reader_weight(k, comps.family)]
        if other:
            names = "/".join(suffix for suffix, _ in TEXT_READERS[comps.family])
            raise UserError(
                f"UCE checkpoint '{f.name}' holds {len(other)} key(s) that are not {names} weights "
                f"(e.g. {', '.join(other[:3])}); use checkpoint=esd for general denoiser weights"
            )
    changed = load_unet_weights(comps.denoiser, tensors, f"{method} checkpoint '{f.name}'")
    sha = file_sha256(f)
    return {
        "method": method,
        "beta": None,
        "source": "user",
        "id": sha[:16],
        "files": [str(f)],
        "sha256": [sha],
        "n_tensors": len(changed),
    }


@UNLEARNING.register("original")
def apply_original(comps, cfg, store, *, task_cfg, judge=None, sample_kwargs=None, logger=None) -> dict:
    """``checkpoint=original``: the model as loaded (no setting is read)."""
    return {"method": "original", "beta": None, "source": "original", "id": "original", "files": []}


@UNLEARNING.register("esd")
def apply_esd(comps, cfg, store, *, task_cfg, judge=None, sample_kwargs=None, logger=None) -> dict:
    """``checkpoint=esd``: train (cached) or load the user's UNet weights."""
    ESDCheckpointConfig.from_cfg(cfg)  # the settings checked; the recipe key hashes them as written
    return _apply_esd(comps, cfg, _store(store), _task(task_cfg), logger)


@UNLEARNING.register("uce")
def apply_uce(comps, cfg, store, *, task_cfg, judge=None, sample_kwargs=None, logger=None) -> dict:
    """``checkpoint=uce``: the closed-form edit of the maps that read the text (cached), or the user's
    edited weights."""
    return _apply_uce(comps, cfg, UCECheckpointConfig.from_cfg(cfg), _store(store), _task(task_cfg))


def esd_key(model, cfg: dict[str, Any], task: dict[str, Any]) -> dict[str, Any]:
    """The artifact key of a trained ESD checkpoint (``unlearning/esd``): its recipe, concept, task and
    the model's identity (``model``: the components, or the planner's stand-in with a ``key()``)."""
    concept = str(_per_task(cfg, "concept", task, fallback=task.get("name")))
    recipe = {k: v for k, v in cfg.items() if k not in (*USER_KEYS, "concept")}
    return {"checkpoint": recipe, "concept": concept, "task": task.get("name"), "model": model.key()}


def spm_key(model, cfg: dict[str, Any], task: dict[str, Any]) -> dict[str, Any]:
    """The artifact key of trained SPM adapters (``unlearning/spm``): the training recipe (not the
    multiplier, which only fuses them), the concept, the task and the model's identity."""
    concept = _per_task(cfg, "concept", task, fallback=task.get("name"))
    concept = "" if concept is None else str(concept)
    recipe = {k: v for k, v in cfg.items() if k not in (*USER_KEYS, "concept", "multiplier")}
    return {"checkpoint": recipe, "concept": concept, "task": task.get("name"), "model": model.key()}


def uce_key(model, cfg: dict[str, Any], task: dict[str, Any]) -> dict[str, Any]:
    """The artifact key of a UCE edit (``unlearning/uce``): its recipe, task and the model's identity."""
    settings = UCECheckpointConfig.from_cfg(cfg)
    erase = _per_task(cfg, "erase", task, fallback=[task.get("name")] if task.get("name") else None)
    recipe = {
        "erase": list(erase) if isinstance(erase, list | tuple) else [erase],
        "guide": _per_task(cfg, "guide", task, fallback=""),
        "preserve": list(_per_task(cfg, "preserve", task, fallback=[]) or []),
        "lamb": settings.lamb,
        "erase_scale": settings.erase_scale,
        "preserve_scale": settings.preserve_scale,
        "templates": list(settings.templates or []),
    }
    return {"recipe": recipe, "task": task.get("name"), "model": model.key()}


def _apply_esd(comps, cfg, store, task, logger) -> dict:
    from unlearn_exp.unlearning.esd import WEIGHTS_FILE, train_esd

    if cfg["path"]:
        return _load_user_unet_weights(comps, cfg, store, "esd", only_text_readers=False)
    key = esd_key(comps, cfg, task)
    concept, recipe = key["concept"], key["checkpoint"]
    final = store.path("unlearning/esd", key)
    work = final.parent / f"{final.name}.work"

    def build(tmp: Path) -> None:  # trains comps.unet in place; the file load below is then a no-op
        info = train_esd(comps, concept, recipe, work_dir=work, out_dir=tmp, logger=logger)
        atomic_write_json(tmp / "manifest.json", {"concept": concept, **info})

    folder = store.get_or_build("unlearning/esd", key, build)
    shutil.rmtree(work, ignore_errors=True)
    f = folder / WEIGHTS_FILE
    load_unet_weights(comps.denoiser, read_safetensors(f), f"ESD artifact '{f}'")
    sha = file_sha256(f)  # by content, as a user's file: the bits the cell samples with
    return {
        "method": "esd",
        "beta": None,
        "source": "trained",
        "id": sha[:16],
        "files": [str(f)],
        "sha256": [sha],
        "variant": recipe.get("variant"),
        "concept": concept,
        "artifact": str(folder),
    }


def _apply_uce(comps, cfg, settings: UCECheckpointConfig, store, task) -> dict:
    from unlearn_exp.unlearning.uce import uce_edit
    from unlearn_exp.unlearning.weights import save_safetensors

    if settings.path:
        return _load_user_unet_weights(comps, cfg, store, "uce", only_text_readers=True)
    key = uce_key(comps, cfg, task)
    recipe = key["recipe"]

    def build(tmp: Path) -> None:
        save_safetensors(uce_edit(comps, recipe), tmp / "uce_cross_attention.safetensors")
        atomic_write_json(tmp / "manifest.json", recipe)

    folder = store.get_or_build("unlearning/uce", key, build)
    f = folder / "uce_cross_attention.safetensors"
    load_unet_weights(comps.denoiser, read_safetensors(f), f"UCE artifact '{f}'")
    sha = file_sha256(f)  # by content, as a user's file: the bits the cell samples with
    return {
        "method": "uce",
        "beta": None,
        "source": "trained",
        "id": sha[:16],
        "files": [str(f)],
        "sha256": [sha],
        "erase": recipe["erase"],
        "artifact": str(folder),
    }


def apply_checkpoint(
    comps: Components,
    checkpoint_cfg,
    store,
    *,
    task_cfg,
    judge=None,
    sample_kwargs: dict[str, Any] | None = None,
    logger=None,
) -> dict[str, Any]:
    """Make ``comps`` the checkpoint ``checkpoint_cfg`` describes; return its identity.

    Identity: ``method``, ``beta``, ``id`` (artifact hash, or a hash of the user's files),
    ``files``, ``sha256``, ``source`` ("original", "trained" or "user") and method details.
    """
    cfg = dict(_plain(checkpoint_cfg) or {})
    method = cfg.get("method")
    if method not in UNLEARNING.names() and not cfg.get("_target_"):
        raise NotImplementedStage(f"unlearning method '{method}' (available: {UNLEARNING.names()})")
    apply = UNLEARNING.get(cfg)
    return apply(
        comps,
        cfg,
        _store(store),
        task_cfg=_task(task_cfg),
        judge=judge,
        sample_kwargs=sample_kwargs,
        logger=logger,
    )
