"""Rebuild a toy grid's shipped training artifacts: ``python -m unlearn_exp.toy.artifacts [--model M]``.

Runs the training stages of the toy model's grid (``+experiment=toy_duo``; ``toy_mmdit_duo`` for the
toy MMDiT, into ``unlearn_exp/toy/artifacts_mmdit/``) (the DUO checkpoint of every beta of the sweep,
the concept embedding ``C*`` inverted on each of them; the shared embedding is the one inverted on
the ``embedding.from_checkpoint`` checkpoint, beta=500) into a fresh artifact cache, through the
cell runner's own functions so that the keys are exactly the ones a cell computes, then copies the
small files of the kinds ``unlearning/duo`` and ``inversion`` (LoRA safetensors, learned embeddings,
metadata, training logs, ``_key.json``) into ``unlearn_exp/toy/artifacts/``. Pair images, image
sets, samples and Lightning checkpoints stay in the build cache.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from unlearn_exp.atomic import atomic_dir, atomic_write_json
from unlearn_exp.config import compose as compose_config
from unlearn_exp.errors import exit_status
from unlearn_exp.store import KEY_FILE
from unlearn_exp.store import manifest as file_list
from unlearn_exp.toy import TOY_MODELS

SHIPPED = Path(__file__).resolve().parent / "artifacts"
KINDS = ("unlearning/duo", "inversion")
SHIPPED_SUFFIXES = (".safetensors", ".json", ".csv", ".txt")


def compose(overrides: list[str]):
    return compose_config(overrides, hydra=True)


def sweep_betas(base: list[str]) -> list[str]:
    """The ``checkpoint.beta`` values of the experiment's sweep."""
    params = compose(base).hydra.sweeper.params
    return [b.strip() for b in str(params["checkpoint.beta"]).split(",")]


def cell_overrides(
    beta: str, embedding: str, cache_dir: Path, extra: list[str], experiment: str = "toy_duo"
) -> list[str]:
    """A guided cell whose concept is learned (so its training stages all run), no shipped cache."""
    return [
        f"+experiment={experiment}",
        f"checkpoint.beta={beta}",
        "guidance=sld",
        f"embedding={embedding}",
        f"paths.cache_dir={cache_dir}",
        "paths.shipped_caches=[]",
        *extra,
    ]


def train_cell(cfg) -> dict[str, list[str]]:
    """The training stages of one cell (the cell runner's stages 0-2 without prompt sets: the image
    set, the checkpoint, the concept), none of its sampling."""
    from unlearn_exp.cell import concept, open_cell, originals, unlearn

    cell = open_cell(cfg, prompts=False)
    concept(cell, originals(cell), unlearn(cell))
    return cell.store.summary()


def copy_small(cache_dir: Path, dest: Path) -> list[Path]:
    """Copy the shipped kinds' files with small-file suffixes from ``cache_dir`` into ``dest``."""
    copied = []
    for kind in KINDS:
        for folder in sorted((cache_dir / kind).glob("*/_key.json")):
            src = folder.parent
            target = dest / kind / src.name
            with atomic_dir(target) as tmp:
                for f in sorted(src.rglob("*")):
                    if f.is_file() and f.suffix in SHIPPED_SUFFIXES and "checkpoints" not in f.parts:
                        out = tmp / f.relative_to(src)
                        out.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(f, out)
                _strip_local_paths(tmp)
            copied.append(target)
    return copied


def _strip_local_paths(folder: Path) -> None:
    """The DUO manifest names the pair set folder of the build machine; ship its name only, and
    record the rewritten file in the artifact's file list (``_key.json``), so that it verifies."""
    manifest = folder / "manifest.json"
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        for a in data.get("adapters", []):
            if a.get("pairs"):
                a["pairs"] = f"unlearning/duo_pairs/{Path(a['pairs']).name}"
        atomic_write_json(manifest, data)
        key = json.loads((folder / KEY_FILE).read_text())
        key["files"] = file_list(folder)
        atomic_write_json(folder / KEY_FILE, key)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build-dir", default=None, help="fresh cache to train into (default: a new temp dir)")
    ap.add_argument("--model", default="toy", choices=sorted(TOY_MODELS), help="the toy model")
    ap.add_argument("--dest", default=None, help="where the small files go (default: the model's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every cell")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("unlearn_exp").setLevel(logging.INFO)

    build = Path(args.build_dir or tempfile.mkdtemp(prefix="toy_artifacts_"))
    cache = build / "cache"

    def body() -> int:
        toy = TOY_MODELS[args.model]
        betas = sweep_betas([f"+experiment={toy.experiment}", *args.overrides])
        cells = [(b, "inverted") for b in betas] + [(betas[0], "shared")]
        for beta, embedding in cells:
            t = time.time()
            over = cell_overrides(beta, embedding, cache, args.overrides, toy.experiment)
            summary = train_cell(compose(over))
            print(f"beta={beta} embedding={embedding}: built {summary['built']} ({time.time() - t:.0f} s)")
        dest = Path(args.dest or SHIPPED.parent / toy.artifacts)
        if dest.exists():
            shutil.rmtree(dest)
        copied = copy_small(cache, dest)
        size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
        print(f"{len(copied)} artifacts ({size / 1e6:.2f} MB) -> {dest}; build cache: {cache}")
        return 0

    return exit_status(body)


if __name__ == "__main__":
    sys.exit(main())
