"""Sample chunks and what is computed on them: images (``samples/<h>``), the judge's verdicts
(``verdicts/<h>``), PP distances (``distances/<h>``) and benign fidelity. A chunk is the unit a
killed sweep resumes from."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unlearn_exp.atomic import atomic_write_json
from unlearn_exp.cell.keys import rows_identity, sample_identity, sampling_settings
from unlearn_exp.identity import resolved_device
from unlearn_exp.progress import StageBar
from unlearn_exp.store import ArtifactStore

if TYPE_CHECKING:
    from unlearn_exp.guidance import Guidance
    from unlearn_exp.models import Components


@dataclass
class Chunk:
    rows: list[dict[str, Any]]
    folder: Path
    key: dict[str, Any]


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
        key = {**identity, "sampling": sample_identity(cfg, device), "rows": rows_identity(part)}

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
                name = f"{j:04d}_{safe_name(r['case_id'])}_{int(r['image_index'])}.png"
                r["image"].save(tmp / name)
                meta.append(
                    {k: v for k, v in r.items() if k not in ("image", "image_tensor")} | {"file": name}
                )
            atomic_write_json(tmp / "meta.json", meta)

        folder = store.get_or_build("samples", key, build)
        chunks.append(Chunk(part, folder, key))
    return chunks


def safe_name(case_id: Any) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(case_id))[:40]


def chunk_meta(chunk: Chunk) -> list[dict[str, Any]]:
    return json.loads((chunk.folder / "meta.json").read_text())


def chunk_images(chunk: Chunk):
    from PIL import Image

    return [Image.open(chunk.folder / m["file"]).convert("RGB") for m in chunk_meta(chunk)]


def judge_chunks(chunks: list[Chunk], judge, store: ArtifactStore, what: str = "") -> list[dict[str, Any]]:
    """The judge's verdict on every image of ``chunks`` (cached per chunk and judge profile)."""
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
