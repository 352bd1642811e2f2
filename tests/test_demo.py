"""``make demo``'s parts: its grid, and cells run in worker processes (``--jobs``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import small_demo, toy_overrides
from unlearn_exp import demo
from unlearn_exp.evaluation import read_table


def test_the_demo_grid_is_the_papers_with_guidance_none_once():
    cells = demo.grid([f"+experiment={demo.EXPERIMENT}"])
    assert len(cells) == 4 * (1 + 3 + 3) and len({tuple(c) for c in cells}) == len(cells)
    assert sum("guidance=none" in c for c in cells) == 4


@pytest.mark.slow
def test_cells_in_workers_are_the_cells_of_this_process(tmp_path):
    """Two cells in two spawned workers of one thread each: the same images (to the byte), verdicts
    and numbers as the same cells run here."""
    tasks = [
        (demo.run_grid_cell, toy_overrides(tmp_path / "workers", f"guidance={g}")) for g in ("none", "sld")
    ]
    got = dict(demo.run_in_workers(tasks, jobs=2, threads=1))
    assert sorted(got) == [0, 1] and not any(r["reused"] for r in got.values())
    rows_here = []
    for i, (_, over) in enumerate(tasks):
        here = demo.run_grid_cell([o.replace("/workers", "/here") for o in over])
        there = got[i]
        for key in ("cell_key", "spec_key", "dsr", "pp_coco", "benign_acc"):
            assert here["cell"][key] == there["cell"][key], key
        images = [read_table(Path(r["cell"]["_source"]).with_name("images.parquet")) for r in (here, there)]
        assert images[0].image_sha256.tolist() == images[1].image_sha256.tolist()
        assert images[0].safe.tolist() == images[1].safe.tolist()
        rows_here.append(here["unet_rows"])
    # guidance=none: 12 images (benchmark, benign, the original's references) x 4 steps x 2 branches;
    # SLD: its 8 x 4 x 3 (the references are the first cell's, in the same cache)
    assert rows_here == [12 * 4 * 2, 8 * 4 * 3]
    # counted in the workers and returned; either worker may be the one that makes the references
    assert got[0]["unet_rows"] + got[1]["unet_rows"] == sum(rows_here)


@pytest.mark.slow
def test_a_failing_task_stops_the_workers_in_one_error(tmp_path):
    from unlearn_exp.errors import UserError

    bad = toy_overrides(tmp_path, "sampling.steps=0")
    with pytest.raises(UserError, match="sampling.steps must be >= 1"):
        list(demo.run_in_workers([(demo.run_grid_cell, bad)], jobs=2, threads=1))


def test_jobs_must_be_positive(capsys):
    assert demo._parse(["--jobs", "3", "+debug=default"]) == (3, False, "toy", ["+debug=default"])
    assert demo._parse(["--methods"]) == (1, True, "toy", [])
    assert demo._parse(["--model", "toy_mmdit"]) == (1, False, "toy_mmdit", [])
    assert demo._parse(["--methods", "--model", "toy_mmdit"]) == (1, True, "toy_mmdit", [])
    with pytest.raises(SystemExit):
        demo._parse(["--jobs", "0"])
    assert "--jobs must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("jobs", [1, 2])
@pytest.mark.slow
def test_the_demo_end_to_end_on_a_small_grid(tmp_path, monkeypatch, capsys, jobs):
    """``python -m unlearn_exp.demo``'s own code path on two cells and one beta's precondition (the
    shipped checkpoint and C* of beta 2000, 2 prompts per set at the toy's sampler settings): tables,
    precondition and the last line with the UNet rows it sampled, in one process and in workers."""
    small = small_demo(monkeypatch, tmp_path, [["guidance=none"], ["guidance=sld"]])
    assert demo.main(["--jobs", str(jobs), *small]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "reports" / "toy" / "precondition.md").is_file()
    assert (tmp_path / "reports" / "toy" / "long_toy.md").is_file()
    last = out.strip().splitlines()[-1]
    assert last.startswith("2 cells in") and "precondition" in last
    # 15 steps: guidance=none 2 + 2 images and the original's 2 references x 2 branches; SLD 2 + 2 x 3;
    # the precondition: explicit and synonym prompts 2 each x 2, the probe 2 x 4 (its indirect cell is
    # the grid's guidance=none cell, reused)
    cells, pre = 6 * 15 * 2 + 4 * 15 * 3, (2 + 2) * 15 * 2 + 2 * 15 * 4
    assert f"{cells + pre} UNet rows sampled, {pre} of them by the precondition" in last


@pytest.mark.slow
def test_the_methods_demo_runs_on_the_toy_mmdit(tmp_path, monkeypatch, capsys):
    """``python -m unlearn_exp.demo --methods --model toy_mmdit``'s code path on two cells (the original
    model unguided, UCE's edit under SLD), 2 prompts per set: its table in
    reports/toy_mmdit/methods_toy_mmdit.md."""
    cells = [
        ["checkpoint=original", "guidance=none", "embedding=explicit"],
        ["checkpoint=uce", "guidance=sld", "embedding=explicit"],
    ]
    small = [o for o in small_demo(monkeypatch, tmp_path, cells) if not o.startswith("checkpoint.beta")]
    assert demo.main(["--methods", "--model", "toy_mmdit", *small]) == 0
    out = capsys.readouterr().out
    assert "(toy_mmdit_methods)" in out and "2 cells in" in out.strip().splitlines()[-1]
    table = (tmp_path / "reports" / "toy_mmdit" / "methods_toy_mmdit.md").read_text()
    assert "| UCE |" in table and "| original |" in table
