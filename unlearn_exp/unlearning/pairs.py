"""DUO's paired data (docs/methods.md 5.1): unsafe images from the original model, safe ones by SDEdit.

A pair recipe is data, not code (``conf/checkpoint/duo.yaml``, ``recipes.<task>.adapters[i]``)::

    name: Nudity
    unsafe_prompts: ["a naked white woman, realistic photo", "a naked black woman, realistic photo"]
    safe_prompts:   ["a dressed white woman, realistic photo", "a dressed black woman, realistic photo"]
    n_pairs: 64          # pair i uses prompt block i * len(prompts) // n_pairs (32 white, then 32 black)
    strength: 0.75       # SDEdit strength of the safe counterpart
    check_unsafe: true   # keep an unsafe image only when the judge flags it
    check_safe: true     # keep a safe counterpart only when the judge finds it safe
    sdedit: {steps: 50, guidance_scale: 7.5}   # optional: the SDEdit step's own sampler settings

Unsafe image i is sampled from its unsafe prompt; its safe counterpart is SDEdit of that image with
the safe prompt and the unsafe prompt as negative prompt. Rejected images are re-sampled with a new
seed, at most ``max_tries`` times per image; past that the build stops with a ``UserError`` saying
how many tries failed and what the judge said. DUO's own script samples unseeded; here every try has
its own seed derived from the recipe seed, so a pair set is reproducible.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unlearn_exp.atomic import atomic_file, atomic_write_json
from unlearn_exp.errors import UserError
from unlearn_exp.hashing import to_plain as _plain
from unlearn_exp.models.components import Components
from unlearn_exp.progress import StageBar

PAIRS_FILE = "pairs.json"


@dataclass
class PairSet:
    """A folder ``unsafe/NN.png``, ``safe/NN.png`` and ``pairs.json`` (prompts, seeds, tries)."""

    root: Path
    records: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.records)

    def images(self, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(unsafe, safe) images as ``(N, 3, H, W)`` tensors in [-1, 1], resized to ``size``."""
        from PIL import Image

        from unlearn_exp.sampling import from_pil

        unsafe = from_pil([Image.open(self.root / r["unsafe_file"]) for r in self.records], size)
        safe = from_pil([Image.open(self.root / r["safe_file"]) for r in self.records], size)
        return unsafe, safe


def load_pair_set(root: str | Path) -> PairSet:
    root = Path(root)
    f = root / PAIRS_FILE
    if not f.is_file():
        raise UserError(f"no DUO pair set at '{root}' ({PAIRS_FILE} missing)")
    return PairSet(root=root, records=json.loads(f.read_text())["pairs"])


def pair_prompts(recipe: dict[str, Any]) -> list[tuple[str, str]]:
    """(unsafe, safe) prompt of every pair: the prompt lists split into equal consecutive blocks."""
    unsafe, safe = list(recipe.get("unsafe_prompts") or []), list(recipe.get("safe_prompts") or [])
    name = recipe.get("name", "?")
    if not unsafe or len(unsafe) != len(safe):
        raise UserError(
            f"DUO pair recipe '{name}': unsafe_prompts and safe_prompts must be non-empty lists of equal "
            f"length (got {len(unsafe)} and {len(safe)})"
        )
    n = int(recipe.get("n_pairs", len(unsafe)))
    if n < 1:
        raise UserError(f"DUO pair recipe '{name}': n_pairs must be >= 1, got {n}")
    return [(unsafe[i * len(unsafe) // n], safe[i * len(safe) // n]) for i in range(n)]


def _seed(base: int, stage: int, pair: int, attempt: int) -> int:
    return (int(base) * 1_000_003 + stage * 7_919_993 + attempt * 104_729 + pair) % (2**31 - 1)


def _judge(judge, pil) -> list[dict[str, Any]]:
    out = judge.judge(pil)
    if len(out) != len(pil) or not all(isinstance(o, dict) and "safe" in o for o in out):
        raise UserError("the judge must return one dict with key 'safe' per image")
    return out


def _why(verdict: dict[str, Any] | None) -> str:
    if not verdict:
        return ""
    extra = {k: v for k, v in verdict.items() if k != "safe"}
    text = json.dumps(extra, default=str)
    return f"; last verdict: {text[:160]}" if extra else ""


@dataclass(frozen=True)
class _Recipe:
    """The settings of one pair recipe, read and checked (docs/methods.md 5.1)."""

    name: str
    prompts: list[tuple[str, str]]
    strength: float
    max_tries: int
    batch: int
    seed: int
    checks: dict[str, bool]
    sdedit: dict[str, Any]  # sampler settings of the SDEdit step where they differ (DUO's SD3 script)


def _read_recipe(recipe: dict[str, Any], judge) -> _Recipe:
    """Read a plain recipe; refuse a missing judge or ``max_tries < 1`` (docs/methods.md 5.1)."""
    name = str(recipe.get("name", "pairs"))
    prompts = pair_prompts(recipe)
    strength = float(recipe.get("strength", 0.75))
    max_tries = int(recipe.get("max_tries", 20))
    batch = max(1, int(recipe.get("batch", 8)))
    seed = int(recipe.get("seed", 42))
    checks = {"unsafe": bool(recipe.get("check_unsafe", True)), "safe": bool(recipe.get("check_safe", True))}
    if any(checks.values()) and judge is None:
        raise UserError(f"DUO pair recipe '{name}' checks images with a judge, but no judge was given")
    if max_tries < 1:
        raise UserError(f"DUO pair recipe '{name}': max_tries must be >= 1, got {max_tries}")
    sdedit = dict(recipe.get("sdedit") or {})
    unknown = sorted(set(sdedit) - {"scheduler", "steps", "guidance_scale"})
    if unknown:
        raise UserError(
            f"DUO pair recipe '{name}': unknown sdedit key(s) {unknown} (scheduler, steps, guidance_scale)"
        )
    return _Recipe(name, prompts, strength, max_tries, batch, seed, checks, sdedit)


def build_pair_set(
    comps: Components,
    recipe: dict[str, Any],
    judge,
    out_dir: str | Path,
    sample_kwargs: dict[str, Any] | None = None,
) -> PairSet:
    """Generate and check one DUO pair set into ``out_dir`` (docs/methods.md 5.1).

    ``recipe`` also carries ``seed``, ``max_tries`` (per image) and ``batch`` (images per sampler
    call). ``sample_kwargs`` go to ``unlearn_exp.sampling.sample`` (scheduler, steps,
    guidance_scale, resolution) for both the unsafe images and the SDEdit step.
    """
    recipe = dict(_plain(recipe))
    r = _read_recipe(recipe, judge)
    kwargs = {k: v for k, v in dict(sample_kwargs or {}).items() if v is not None}
    kwargs.pop("guidance", None)
    out_dir = Path(out_dir)
    n = len(r.prompts)
    images: dict[str, list[torch.Tensor | None]] = {"unsafe": [None] * n, "safe": [None] * n}
    records = [
        {"index": i, "unsafe_prompt": u, "safe_prompt": s, "tries": {"unsafe": 0, "safe": 0}}
        for i, (u, s) in enumerate(r.prompts)
    ]

    bar = StageBar(f"DUO pairs ({r.name})", 2 * n, "img")
    for stage_idx, stage in enumerate(("unsafe", "safe")):
        _fill_stage(comps, r, judge, stage_idx, stage, images, records, bar, kwargs)

    bar.close()
    _write_pair_set(out_dir, r.name, recipe, images, records)
    return PairSet(root=out_dir, records=records)


def _fill_stage(
    comps: Components,
    r: _Recipe,
    judge,
    stage_idx: int,
    stage: str,
    images: dict[str, list[torch.Tensor | None]],
    records: list[dict[str, Any]],
    bar,
    kwargs: dict[str, Any],
) -> None:
    """Sample and judge one stage's images, re-sampling rejected ones (docs/methods.md 5.1)."""
    n = len(r.prompts)
    last_verdict: dict[str, Any] | None = None
    for attempt in range(r.max_tries):
        pending = [i for i in range(n) if images[stage][i] is None]
        if not pending:
            break
        for start in range(0, len(pending), r.batch):
            idx = pending[start : start + r.batch]
            seeds = [_seed(r.seed, stage_idx, i, attempt) for i in idx]
            out = _sample_batch(comps, r, stage, idx, seeds, images, kwargs)
            verdicts = _judge(judge, out.pil) if r.checks[stage] else [None] * len(idx)
            rejected = _keep_accepted(stage, idx, seeds, out, verdicts, images, records, bar)
            if rejected is not None:
                last_verdict = rejected
    failed = [i for i in range(n) if images[stage][i] is None]
    if failed:
        bar.close()
        wrong = "safe" if stage == "unsafe" else "unsafe"
        raise UserError(
            f"DUO pair set '{r.name}': {len(failed)} of {n} {stage} images were not accepted within "
            f"max_tries={r.max_tries} ({len(failed) * r.max_tries} tries failed, e.g. pair {failed[0]}): "
            f"the judge found every try {wrong}{_why(last_verdict)}. Raise max_tries or check the "
            "prompts, the SDEdit strength and the judge"
        )


def _sample_batch(
    comps: Components,
    r: _Recipe,
    stage: str,
    idx: list[int],
    seeds: list[int],
    images: dict[str, list[torch.Tensor | None]],
    kwargs: dict[str, Any],
):
    """One sampler call: unsafe images, or their SDEdit safe counterparts (docs/methods.md 5.1)."""
    from unlearn_exp.sampling import sample

    if stage == "unsafe":
        return sample(comps, [r.prompts[i][0] for i in idx], seeds, **kwargs)
    return sample(
        comps,
        [r.prompts[i][1] for i in idx],
        seeds,
        negative_prompts=[r.prompts[i][0] for i in idx],
        init_images=torch.stack([images["unsafe"][i] for i in idx]),
        strength=r.strength,
        **{**kwargs, **r.sdedit},
    )


def _keep_accepted(
    stage: str,
    idx: list[int],
    seeds: list[int],
    out,
    verdicts: list[dict[str, Any] | None],
    images: dict[str, list[torch.Tensor | None]],
    records: list[dict[str, Any]],
    bar,
) -> dict[str, Any] | None:
    """Count the tries and keep the accepted images (docs/methods.md 5.1); the last rejected verdict."""
    rejected: dict[str, Any] | None = None
    for j, i in enumerate(idx):
        records[i]["tries"][stage] += 1
        v = verdicts[j]
        # an unsafe image is kept when flagged, a safe counterpart when found safe
        ok = v is None or (bool(v["safe"]) == (stage == "safe"))
        if ok:
            bar.update(1)
            images[stage][i] = out.images[j]
            records[i][f"{stage}_seed"] = seeds[j]
            records[i][f"{stage}_verdict"] = v
        else:
            rejected = v
    return rejected


def _write_pair_set(
    out_dir: Path,
    name: str,
    recipe: dict[str, Any],
    images: dict[str, list[torch.Tensor | None]],
    records: list[dict[str, Any]],
) -> None:
    """Write ``unsafe/NNN.png``, ``safe/NNN.png``, then ``pairs.json``, atomically (docs/methods.md 5.1)."""
    from unlearn_exp.sampling import to_pil

    for stage in ("unsafe", "safe"):
        (out_dir / stage).mkdir(parents=True, exist_ok=True)
        pil = to_pil(torch.stack(images[stage]))
        for i, im in enumerate(pil):
            rel = f"{stage}/{i:03d}.png"
            with atomic_file(out_dir / rel) as tmp:
                im.save(tmp, format="PNG")
            records[i][f"{stage}_file"] = rel
    atomic_write_json(out_dir / PAIRS_FILE, {"name": name, "recipe": recipe, "pairs": records})
