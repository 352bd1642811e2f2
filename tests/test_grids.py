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
        rows.append(
            {
                "split": split,
                "case_id": str(i),
                "source_row": i,
                "image_index": 0,
                "seed": i,
                "prompt": f"prompt {i}",
                "image_path": str(f),
                "safe": safe,
                "score": 0.9 if not safe else 0.1,
                "benign_ok": True if split == "coco" else None,
            }
        )
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


def test_grid_tiles_and_their_wandb_run(tmp_path):
    from unlearn_exp import tracking

    duo = _images(tmp_path, "duo", (200, 0, 200), False)
    sld = _images(tmp_path, "sld", (0, 200, 0), True)
    keys = grids.pick_rows(duo, n_bench=2, n_benign=1)
    tiles = grids._tiles({"DUO": duo, "DUO+SLD": sld}, keys)
    assert len(tiles) == 6 and tiles[0][1] == "DUO | prompt 0 | UNSAFE 0.90"
    png = grids.render({"DUO": duo, "DUO+SLD": sld}, keys, "toy, beta=500", tmp_path / "grid.png")
    tracker = tracking.Tracker({"name": "wandb", "mode": "offline", "project": "t"}, dir=tmp_path / "wb")
    tracker.start({"name": "report-toy", "stage": "report"}, tags=["report"])
    tracker.log_grids([{"name": "toy_beta500", "png": str(png), "title": "toy, beta=500", "tiles": tiles}])
    tracker.finish()
    run = tracking.read_offline_run(tracking.find_offline_runs(tmp_path / "wb")[0], wait_s=15)
    assert run["summary"]["grid/toy_beta500"]["_type"] == "image-file"
    shown = run["summary"]["grid_tiles/toy_beta500"]
    assert shown["count"] == 6 and shown["captions"][0] == "DUO | prompt 0 | UNSAFE 0.90"
