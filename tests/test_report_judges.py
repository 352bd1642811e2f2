"""``report --judges``: several judge profiles on the same recorded images, with Cohen's kappa."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.helpers import toy_overrides
from unlearn_exp import config
from unlearn_exp.cell import run_cell
from unlearn_exp.errors import UserError
from unlearn_exp.report.judges import cohen_kappa, judges_table, write_judges
from unlearn_exp.report.reproduce import main


def test_cohen_kappa_by_hand():
    # p_o = 3/4; p_a = 1/2, p_b = 1/4; p_e = 1/8 + 3/8 = 1/2; kappa = (3/4 - 1/2) / (1/2) = 1/2
    assert cohen_kappa([True, True, False, False], [True, False, False, False]) == pytest.approx(0.5)
    assert cohen_kappa([True, False, True, False], [False, True, False, True]) == pytest.approx(-1.0)
    assert cohen_kappa([False] * 5, [False] * 5) == 1.0  # one class, full agreement
    assert math.isnan(cohen_kappa([], []))
    with pytest.raises(ValueError, match="same images"):
        cohen_kappa([True], [True, False])


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("judges")
    run_cell(config.compose(toy_overrides(root, "benchmark.n=8")))
    return root / "results"


def test_two_profiles_on_the_same_images(recorded, tmp_path):
    from unlearn_exp.report.tables import load_cells

    cell = load_cells([recorded]).iloc[0]
    table = judges_table([recorded], ["toy", "toy_strict"])
    row = table.iloc[0]
    assert row["n"] == cell["n_images"] == 8
    assert row["dsr[toy]"] == pytest.approx(cell["dsr"])  # the cell's own judge, recomputed
    assert bool(row["reproduced"])  # None would mean no requested profile was the cell's judge
    assert row["dsr[toy_strict]"] >= row["dsr[toy]"]  # a stricter 'unsafe' never lowers DSR
    assert -1.0 <= row["kappa[toy,toy_strict]"] <= 1.0
    written = write_judges(table, ["toy", "toy_strict"], tmp_path)
    assert "kappa toy / toy_strict" in written[0].read_text() and written[1].is_file()


def test_cli_prints_the_table_and_refuses_bad_input(recorded, tmp_path, capsys):
    out = tmp_path / "reports"
    assert (
        main(["--scale", "toy", "--judges", "toy,toy_strict", "--results", str(recorded), "--out", str(out)])
        == 0
    )
    assert "| DSR toy | DSR toy_strict |" in capsys.readouterr().out.replace("n | ", "")
    assert (out / "toy" / "judges.md").is_file()
    assert main(["--judges", "toy,no_such_judge", "--results", str(recorded), "--out", str(out)]) == 2
    assert "unknown judge 'no_such_judge'" in capsys.readouterr().err
    assert main(["--judges", "toy", "--results", str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert "no recorded cells" in capsys.readouterr().err


def test_a_changed_image_stops_the_report(recorded, tmp_path):
    import shutil

    copy = tmp_path / "results"
    shutil.copytree(recorded, copy)
    from unlearn_exp.evaluation.records import read_table, write_table

    images = read_table(next(copy.rglob("images.parquet")))
    bench = images.index[images["split"] == "bench"][0]
    moved = tmp_path / "changed.png"
    shutil.copy(images.loc[bench, "image_path"], moved)
    with open(moved, "ab") as f:
        f.write(b"\0")
    images.loc[bench, "image_path"] = str(moved)
    write_table(images, next(copy.rglob("images.parquet")))
    with pytest.raises(UserError, match="changed since it was judged"):
        judges_table([copy], ["toy"])
