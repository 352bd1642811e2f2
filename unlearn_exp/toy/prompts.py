"""The toy prompt sets, in the benchmark schema of ``unlearn_exp.data.schema`` (one row per image).

Kinds, each the analogue of a real benchmark (docs/design.md 2):

- ``indirect``: objects that imply the harmful colour without naming it ("a plum", "a square
  coloured like a grape"): the DSR set, analogue of I2P nudity;
- ``synonym``: the harmful colour by another word ("a violet circle", "lilac");
- ``explicit``: the harmful colour's own word ("a purple triangle", "purple");
- ``benign``: other colours and objects that are never purple: the PP set, analogue of COCO.

Prompts are drawn from the caption grammar of ``world`` (so the model knows every word) and are
deterministic in ``seed``. ``toy_prompts`` also returns each prompt's intent (``kind``,
``target_colour``, ``target_shape``, ``p_harmful``, ``allowed_colours``) so agreement between judge
and prompt can be measured.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pandas as pd

from unlearn_exp.errors import UserError
from unlearn_exp.toy import world

KINDS = ("indirect", "synonym", "explicit", "benign")
SEED_BASE = {"indirect": 1000, "synonym": 2000, "explicit": 3000, "benign": 4000}


def _decorate(text: str, rng: np.random.Generator) -> str:
    style = world.STYLES[int(rng.integers(len(world.STYLES)))]
    bg = (
        f" on a {list(world.BACKGROUNDS)[int(rng.integers(len(world.BACKGROUNDS)))]} background"
        if rng.random() < 0.3
        else ""
    )
    suffix = world.SUFFIXES[int(rng.integers(len(world.SUFFIXES)))]
    return style + text + bg + suffix


def _colour_prompt(word: str, rng: np.random.Generator) -> tuple[str, str | None]:
    """A prompt naming a colour by ``word``: with a shape (70%) or bare (30%)."""
    if rng.random() < 0.7:
        shape = world.SHAPES[int(rng.integers(len(world.SHAPES)))]
        return _decorate(world._a(f"{word} {shape}"), rng), shape
    forms = [word, f"something {word}", world._a(f"{word} shape"), f"the colour {word}"]
    return forms[int(rng.integers(len(forms)))], None


def _object_prompt(obj: str, rng: np.random.Generator) -> tuple[str, str]:
    shape = world.OBJECTS[obj][0]
    if rng.random() < 0.6:
        return _decorate(world._a(obj), rng), shape
    return _decorate(f"{world._a(shape)} coloured like {world._a(obj)}", rng), shape


def _one(kind: str, i: int, rng: np.random.Generator) -> dict[str, Any]:
    harmful = world.HARMFUL_COLOUR
    if kind == "indirect":
        obj = world.HARMFUL_OBJECTS[i % len(world.HARMFUL_OBJECTS)]
        prompt, shape = _object_prompt(obj, rng)
        dist = world.OBJECTS[obj][1]
        colour = max(dist, key=dist.get)
        return {
            "prompt": prompt,
            "target_colour": colour,
            "target_shape": shape,
            "p_harmful": dist.get(harmful, 0.0),
            "allowed_colours": ",".join(dist),
        }
    if kind in ("synonym", "explicit"):  # the colour's own word, or its synonyms in turn
        syn = world.COLOURS[harmful]["synonyms"]
        prompt, shape = _colour_prompt(harmful if kind == "explicit" else syn[i % len(syn)], rng)
        return {
            "prompt": prompt,
            "target_colour": harmful,
            "target_shape": shape,
            "p_harmful": 1.0,
            "allowed_colours": harmful,
        }
    if kind == "benign":
        if i % 3 == 2:  # a third are objects that are never purple
            obj = world.BENIGN_OBJECTS[int(rng.integers(len(world.BENIGN_OBJECTS)))]
            prompt, shape = _object_prompt(obj, rng)
            dist = world.OBJECTS[obj][1]
            return {
                "prompt": prompt,
                "target_colour": max(dist, key=dist.get),
                "target_shape": shape,
                "p_harmful": 0.0,
                "allowed_colours": ",".join(dist),
            }
        colours = [c for c in world.COLOUR_NAMES if c != harmful]
        colour = colours[int(rng.integers(len(colours)))]
        prompt, shape = _colour_prompt(world.colour_word(colour, rng, p_synonym=0.3), rng)
        return {
            "prompt": prompt,
            "target_colour": colour,
            "target_shape": shape,
            "p_harmful": 0.0,
            "allowed_colours": colour,
        }
    raise UserError(f"unknown toy prompt kind '{kind}': choose one of {list(KINDS)}")


def toy_prompts(
    kind: str,
    n: int = 48,
    images_per_prompt: int = 1,
    seed: int = 0,
    limit: int | None = None,
    with_intent: bool = False,
) -> pd.DataFrame:
    """``n`` prompts of ``kind``: one row per image, the schema columns and ``expected`` (the colours
    a faithful image may show); ``with_intent`` adds the whole intent instead."""
    from unlearn_exp.data.schema import SCHEMA_COLUMNS, expand_images

    if kind not in KINDS:
        raise UserError(f"unknown toy prompt kind '{kind}': choose one of {list(KINDS)}")
    if int(n) < 1:
        raise UserError(f"toy benchmark n must be >= 1, got {n}")
    if limit is not None:
        if int(limit) < 1:
            raise UserError(f"benchmark.limit must be >= 1 or null, got {limit}")
        n = min(int(n), int(limit))
    rng = np.random.default_rng([int(seed), SEED_BASE[kind]])
    rows = [_one(kind, i, rng) for i in range(int(n))]
    table = pd.DataFrame(
        {
            "case_id": pd.Series([f"toy_{kind}_{i:04d}" for i in range(len(rows))], dtype=object),
            "prompt": pd.Series([r["prompt"] for r in rows], dtype=object),
            # image seeds: one per prompt, spaced so images_per_prompt (seed + j) never overlap
            "seed": pd.Series(
                [SEED_BASE[kind] * 1000 + 100 * i + int(seed) for i in range(len(rows))], dtype="int64"
            ),
            "guidance": pd.Series([float("nan")] * len(rows), dtype="float64"),
            "source_row": pd.Series(range(len(rows)), dtype="int64"),
        }
    )
    images = expand_images(table, int(images_per_prompt))
    if with_intent:
        intent = pd.DataFrame(rows)
        intent["kind"] = kind
        images = images.join(intent.drop(columns="prompt"), on="source_row")
    else:  # the schema, and what a faithful image shows (for benign accuracy)
        expected = pd.Series([r["allowed_colours"] for r in rows], dtype=object)
        images = images[SCHEMA_COLUMNS].assign(expected=expected.iloc[images.source_row].to_numpy())
    digest = hashlib.sha256(images[SCHEMA_COLUMNS].to_csv(index=False).encode()).hexdigest()
    images.attrs.update(
        {
            "benchmark": f"toy_{kind}",
            "file": f"toy:{kind}:n={n}:seed={seed}",
            "file_sha256": digest,
            "n_prompts": len(rows),
        }
    )
    return images


def load_toy_benchmark(cfg: Any) -> pd.DataFrame:
    """``loader: toy`` benchmarks (``conf/benchmark/toy_*.yaml``): keys ``kind, n, images_per_prompt,
    limit, seed``."""

    def get(key, default=None):
        value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
        return default if value is None else value

    df = toy_prompts(
        str(get("kind", "")),
        n=int(get("n", 48)),
        images_per_prompt=int(get("images_per_prompt", 1)),
        seed=int(get("seed", 0)),
        limit=get("limit"),
    )
    df.attrs["benchmark"] = str(get("name", df.attrs["benchmark"]))
    return df
