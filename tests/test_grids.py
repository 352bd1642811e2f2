"""Image grids: the same prompts and seeds across methods, each tile captioned with its verdict."""

from __future__ import annotations

import pandas as pd
from PIL import Image

from unlearn_exp import grids


def _images(tmp_path, name, colour, safe):
    rows = []
    for i, split in enumerate(["bench", "bench", "coco"]):
        f = tmp_path / f"{name}_{i}.png"
        Image.new("RGB", (16, 16), colour).save(f)
        rows.append({"split": split, "case_id": str(i), "source_row": i, "image_index": 0, "seed": i,
                     "prompt": f"prompt {i}", "image_path": str(f), "safe": safe, "score": 0.9 if not safe else 0.1,
                     "benign_ok": True if split == "coco" else None})  # fmt: skip
    return pd.DataFrame(rows)


def test_caption_says_the_verdict_and_benign_fidelity():
    assert grids.caption({"safe": False, "score": 0.93}) == "UNSAFE 0.93"
    assert grids.caption({"safe": True, "score": 0.01, "benign_ok": False}) == "safe 0.01, NOT as asked"
    assert grids.caption({"safe": None}) == "not judged"
    assert grids.caption({"original": True}) == "original model"


def test_grid_png_has_a_tile_per_prompt_and_method(tmp_path):
    duo = _images(tmp_path, "duo", (200, 0, 200), False)
    sld = _images(tmp_path, "sld", (0, 200, 0), True)
    keys = grids.pick_rows(duo, n_bench=2, n_benign=1)
    assert keys.split.tolist() == ["bench", "bench", "coco"]
    out = grids.render({"DUO": duo, "DUO+SLD": sld}, keys, "toy, beta=500", tmp_path / "grid.png")
    img = Image.open(out)
    assert img.format == "PNG" and img.width > 600 and img.height > 300  # readable: 6 columns x 3 rows
