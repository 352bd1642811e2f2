"""Image sets for concept inversion (docs/methods.md 6.3): a folder given by path, or a generated set.

A generated set is sampled by a configured model from prompts and keeps only the images the
configured judge flags as unsafe (the default recipe is the unsafe half of DUO's pair set,
docs/methods.md 5.1 / 6.3). It is written into the folder it is given (PNGs, then ``manifest.json``)
only once enough images were kept, so the artifact store can build it in a temporary folder.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from unlearn_exp.atomic import atomic_file, atomic_write_json
from unlearn_exp.errors import UserError
from unlearn_exp.hashing import file_sha256
from unlearn_exp.models.components import Components
from unlearn_exp.progress import StageBar

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MANIFEST = "manifest.json"


@dataclass
class ImageSet:
    """Training images ``(N, 3, H, W)`` in [-1, 1] and where they came from."""

    images: torch.Tensor
    identity: str  # sha256 over the files' names and contents (or the tensor's bytes)
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # conversions applied (modes, sizes)

    def describe(self) -> dict[str, Any]:
        return {
            "identity": self.identity,
            "n_images": int(self.images.shape[0]),
            "resolution": list(self.images.shape[-2:]),
            "files": self.files,
            "notes": self.notes,
        }


def _to_tensor(im: Image.Image) -> torch.Tensor:
    data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return data.view(im.size[1], im.size[0], 3).permute(2, 0, 1).float() / 127.5 - 1


def read_image_folder(path: str | Path, resolution: int) -> ImageSet:
    """Read every image of a folder as RGB at ``resolution`` x ``resolution`` (bicubic, no crop).

    Other modes are converted to RGB and other sizes resized, as the CCE/diffusers training
    pipeline does (docs/methods.md 6.2); both are logged and listed in ``notes``.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {folder}")
    modes: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    out, digest = [], hashlib.sha256()
    for p in files:
        try:
            with Image.open(p) as im:
                im.load()
                if im.mode != "RGB":
                    modes[im.mode] += 1
                    im = im.convert("RGB")
                if im.size != (resolution, resolution):
                    sizes[f"{im.size[0]}x{im.size[1]}"] += 1
                    im = im.resize((resolution, resolution), Image.BICUBIC)
                out.append(_to_tensor(im))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise UserError(f"cannot read image {p}: {exc}") from None
        digest.update(f"{p.name}\0{file_sha256(p)}\n".encode())
    notes = []
    if modes:
        notes.append(
            f"converted {sum(modes.values())} image(s) to RGB from modes {dict(sorted(modes.items()))}"
        )
    if sizes:
        notes.append(
            f"resized {sum(sizes.values())} image(s) of sizes {dict(sorted(sizes.items()))} "
            f"to {resolution}x{resolution} (bicubic, no crop)"
        )
    for n in notes:
        log.warning("image folder %s: %s", folder, n)
    return ImageSet(torch.stack(out), digest.hexdigest(), [p.name for p in files], notes)


def load_image_folder(path: str | Path, resolution: int) -> torch.Tensor:
    """``(N, 3, H, W)`` in [-1, 1] from a folder of images (see ``read_image_folder``)."""
    return read_image_folder(path, resolution).images


def tensor_image_set(images: torch.Tensor, resolution: int | None = None) -> ImageSet:
    """Wrap an in-memory ``(N, 3, H, W)`` tensor in [-1, 1]; identity is the hash of its bytes."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise UserError(f"training images must be a (N, 3, H, W) tensor, got {shape}")
    if images.shape[0] == 0:
        raise UserError("the training image tensor is empty")
    images = images.detach().float().cpu()
    if not torch.isfinite(images).all() or images.abs().max() > 1.0 + 1e-4:
        raise UserError("training images must be finite and in [-1, 1]")
    if resolution is not None and tuple(images.shape[-2:]) != (resolution, resolution):
        raise UserError(
            f"training images are {images.shape[-1]}x{images.shape[-2]} but the model expects "
            f"{resolution}x{resolution}"
        )
    digest = hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()
    return ImageSet(images, digest)


# ----------------------------------------------------------------------------- generated sets
def _seed_stream(seeds: list[int]):
    """The given seeds in order, then the integers after the largest of them."""
    yield from (int(s) for s in seeds)
    nxt = max((int(s) for s in seeds), default=-1) + 1
    while True:
        yield nxt
        nxt += 1


def _stop_if_unreachable(prompts, kept, quota, tried, budget, max_tries, judge) -> None:
    """Stop (one line naming the prompt and the counts) once a prompt cannot fill its quota within
    its share of ``max_tries``: at its budget, or early where its flagged rate so far would fill less
    than half of it."""
    for i, prompt in enumerate(prompts):
        have, need, n = len(kept[i]), quota[i], tried[i]
        if have >= need or n == 0:
            continue
        projected = have + have / n * max(budget[i] - n, 0)
        if n >= budget[i] or (n >= max(8, budget[i] // 4) and projected < 0.5 * need):
            raise UserError(
                f"image set: the filter '{getattr(judge, 'name', 'filter')}' flagged prompt '{prompt}' on "
                f"{have} of {n} tries; it needs {need} within about {budget[i]} "
                f"(inversion.image_set.max_tries={max_tries}): "
                "raise max_tries, change the prompt or the filter"
            )


def _write_images(out_dir: Path, items: list[tuple[Image.Image, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each kept image as ``<index>.png`` (written atomically), with its manifest entry."""
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for j, (pil, info) in enumerate(items):
        name = f"{j:05d}.png"
        with atomic_file(out_dir / name) as tmp:
            pil.save(tmp, format="PNG")
        entries.append({"file": name, "sha256": file_sha256(out_dir / name), **info})
    return entries


def generate_image_set(
    comps: Components,
    prompts: list[str],
    seeds: list[int],
    judge,
    out_dir: str | Path,
    n_images: int,
    max_tries: int,
    sample_kwargs: dict[str, Any] | None = None,
    *,
    batch_size: int = 4,
) -> dict[str, Any]:
    """Sample until the judge flags ``n_images`` images as unsafe; write them and ``manifest.json``.

    The quota is split evenly over ``prompts`` (DUO's recipe: 32 per prompt). Each candidate
    takes the next seed of ``seeds`` (then the integers after the largest); ``max_tries`` caps
    the number of images sampled. ``judge.judge(pil_images)`` returns dicts with key ``safe``.
    Nothing is written unless the quota is met. Returns the manifest.
    """
    from unlearn_exp.sampling import sample

    prompts = [str(p) for p in prompts]
    if not prompts:
        raise UserError("the image-set recipe has no prompts")
    if n_images < 1 or max_tries < n_images:
        raise UserError(f"need 1 <= n_images <= max_tries, got n_images={n_images}, max_tries={max_tries}")
    quota = [n_images // len(prompts) + (i < n_images % len(prompts)) for i in range(len(prompts))]
    kept: list[list[tuple[Image.Image, dict[str, Any]]]] = [[] for _ in prompts]
    seed_iter = _seed_stream(list(seeds))
    tries, n_safe, turn = 0, 0, 0
    tried = [0] * len(prompts)  # per prompt: a prompt the filter rarely flags stops the build early
    budget = [max(1, math.ceil(max_tries * q / n_images)) for q in quota]
    bar = StageBar(f"C* image set (kept by {getattr(judge, 'name', 'the filter')})", n_images, "img")
    try:
        while tries < max_tries and any(len(k) < q for k, q in zip(kept, quota)):
            batch: list[tuple[int, str, int]] = []
            room = sum(q - len(k) for k, q in zip(kept, quota))
            while len(batch) < min(batch_size, max_tries - tries, room):
                i = turn % len(prompts)
                turn += 1
                if len(kept[i]) + sum(b[0] == i for b in batch) < quota[i]:
                    batch.append((i, prompts[i], next(seed_iter)))
            out = sample(comps, [b[1] for b in batch], [b[2] for b in batch], **(sample_kwargs or {}))
            verdicts = judge.judge(out.pil)
            tries += len(batch)
            for (i, prompt, seed), pil, verdict in zip(batch, out.pil, verdicts):
                tried[i] += 1
                if verdict["safe"]:
                    n_safe += 1
                elif len(kept[i]) < quota[i]:
                    kept[i].append((pil, {"prompt": prompt, "seed": seed, "judge": verdict}))
                    bar.update(1)
            _stop_if_unreachable(prompts, kept, quota, tried, budget, max_tries, judge)
    finally:
        bar.close()
    n_kept = sum(len(k) for k in kept)
    if n_kept < n_images:
        raise UserError(
            f"image set: the judge flagged only {n_kept} of the {n_images} images needed after {tries} tries "
            f"({n_safe} judged safe): raise max_tries, change the prompts or check the judge"
        )
    out_dir = Path(out_dir)
    entries = _write_images(out_dir, [item for group in kept for item in group])
    manifest = {
        "n_images": n_images,
        "tries": tries,
        "judged_safe": n_safe,
        "prompts": prompts,
        "quota": quota,
        "judge": getattr(judge, "name", type(judge).__name__),
        "model": comps.name,
        "model_source": comps.source,
        "sample_kwargs": dict(sample_kwargs or {}),
        "images": entries,
    }
    atomic_write_json(out_dir / MANIFEST, manifest)
    log.info("image set: kept %d images after %d tries in %s", n_images, tries, out_dir)
    return manifest
