"""The identity keys of a cell's artifacts: what a sample chunk, an image set, ``C*`` and a cell
result are keyed by (docs/design.md 4). Each key holds exactly the config that determines the
product, so a cache hit is the same computation and a changed setting is a new artifact."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from unlearn_exp.hashing import config_hash
from unlearn_exp.hashing import to_plain as plain
from unlearn_exp.identity import concept_checkpoint, resolved_precision, without_neutral

if TYPE_CHECKING:
    from unlearn_exp.models import Components


ORIGINAL = {"checkpoint": "original", "guidance": {"name": "none"}}


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


def rows_identity(rows: list[dict[str, Any]]) -> str:
    return config_hash([[r["case_id"], r["prompt"], int(r["seed"]), int(r["image_index"])] for r in rows])


def checkpoint_for_inversion(cfg) -> dict[str, Any]:
    """The checkpoint whose ``C*`` this cell uses: its own (``inverted``) or the shared source."""
    return concept_checkpoint(
        plain(cfg.checkpoint), plain(cfg.embedding), cfg.task.get("name"), plain(cfg.get("debug"))
    )


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


def inversion_key(cfg, model_id: str, image_set_id: str, learned_on: str) -> dict[str, Any]:
    """The key of ``C*``: the model, the content id of the checkpoint it is learned on (``learned_on``:
    the weights it was optimised against, not their recipe), the inversion settings and the images."""
    inv = without_neutral("inversion", plain(cfg.inversion))
    inv.pop("image_set", None)
    return {
        "model": model_id,
        "checkpoint": learned_on,
        "inversion": inv,
        "image_set": image_set_id,
    }


def cell_key(
    identity: dict[str, Any],
    bench_attrs: dict[str, Any],
    bench: list[dict[str, Any]],
    sampling: dict[str, Any],
    judge_hash: str,
    pp_hash: str,
    pp_sets: dict[str, list[dict[str, Any]]],
) -> str:
    """The key of a cell's result folder: what is sampled (``identity``), the benchmark file and its
    rows, the sampler with everything that decides an image's bits (``sampling``: the cell's
    ``sample_identity``, batch size and precision included), the judge and PP profiles, and the PP
    prompt rows."""
    return config_hash(
        {
            **identity,
            "benchmark": [bench_attrs.get("benchmark"), bench_attrs.get("file_sha256"), rows_identity(bench)],
            "sampling": sampling,
            "judge": judge_hash,
            "pp": pp_hash,
            "pp_sets": {k: rows_identity(v) for k, v in pp_sets.items()},
        }
    )
