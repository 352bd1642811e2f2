"""The toy study's rules, fixed before any run: margins and verdicts on grids whose answers are known."""

from __future__ import annotations

import pandas as pd
import pytest

from unlearn_exp.toy.study import margins, verdicts


def _grid(none: float, words: float, own: float, shared: float) -> pd.DataFrame:
    rows = []
    for beta in (250.0, 500.0, 1000.0, 2000.0):
        rows.append({"beta": beta, "guidance": "none", "embedding": "none", "dsr": none})
        for g in ("sld", "safree"):
            for emb, dsr in (("explicit", words), ("inverted", own), ("shared", shared)):
                rows.append({"beta": beta, "guidance": g, "embedding": emb, "dsr": dsr})
    return pd.DataFrame(rows)


def test_margins_follow_the_written_rules():
    # the paper's picture: words add 0.05, C* adds 0.45, the shared C* beats the words
    m = margins(_grid(none=0.45, words=0.50, own=0.90, shared=0.85))
    assert m["a"] == pytest.approx(0.5 * 0.45 - 0.05)
    assert m["b"] == pytest.approx(0.90 - 0.50 - 0.10)
    assert m["c"] == pytest.approx(0.35)
    # the toy's old picture: the words add as much as C*
    m = margins(_grid(none=0.2, words=0.7, own=0.75, shared=0.6))
    assert m["a"] < 0 and m["b"] < 0 and m["c"] < 0


def test_an_exact_tie_is_a_tie_whatever_the_rounding_error():
    # the study's seed pairs 1/1, 2/0, 2/1: the words add 1/48 of DSR, C* adds 2/48, exactly half;
    # in floating point the slack comes out as -2.8e-17 or +2.8e-17 depending on the values
    for none in (15 / 48, 16 / 48, 14 / 48):
        m = margins(_grid(none=none, words=none + 1 / 48, own=none + 2 / 48, shared=none + 2 / 48))
        assert m["a"] == 0.0 and f"{m['a']:+.3f}" == "+0.000"  # not "-0.000" in the report
        table = verdicts(pd.DataFrame([{"duo_seed": 1, "prompt_seed": 0, **m}]))
        assert table.set_index("finding").loc["a", "verdict"] == "not"  # (a) is strict: <
        assert table.set_index("finding").loc["c", "verdict"] == "reproduced"  # (c) is >=


def test_the_precondition_rule_reads_the_explicit_prompts_unguided_cells():
    grid = _grid(none=0.45, words=0.50, own=0.90, shared=0.85).assign(benchmark="toy_indirect")
    explicit = grid[grid.guidance == "none"].assign(benchmark="toy_explicit", dsr=[1.0, 0.9, 0.8, 0.7])
    m = margins(pd.concat([grid, explicit]))
    assert m["0"] == pytest.approx(0.70 - 0.45 - 0.15)  # the smallest gap, at beta 2000
    assert m["a"] == pytest.approx(0.5 * 0.45 - 0.05)  # the other rules read the indirect cells only
    assert pd.isna(margins(grid)["0"])  # no explicit cells: not measured
    table = verdicts(pd.DataFrame([{"duo_seed": 42, "prompt_seed": 0, **m}])).set_index("finding")
    assert table.loc["0", "verdict"] == "reproduced"


def test_verdicts_count_seed_pairs():
    per_seed = pd.DataFrame(
        [
            {"duo_seed": 42, "prompt_seed": 0, "a": 0.1, "b": 0.0, "c": -0.1},
            {"duo_seed": 1, "prompt_seed": 0, "a": 0.2, "b": -0.2, "c": -0.3},
        ]
    )
    table = verdicts(per_seed).set_index("finding")
    assert table.loc["a", "verdict"] == "reproduced" and table.loc["a", "holds"] == "2/2"
    assert table.loc["b", "verdict"] == "partly" and table.loc["b", "holds"] == "1/2"  # 0 holds for >=
    assert table.loc["c", "verdict"] == "not"
    assert table.loc["a", "mean"] == pytest.approx(0.15)


def test_a_missing_cell_is_an_error_not_a_number():
    grid = _grid(0.4, 0.5, 0.9, 0.8)
    grid = grid[~((grid.beta == 2000.0) & (grid.guidance == "sld") & (grid.embedding == "inverted"))]
    with pytest.raises(ValueError, match="beta=2000 sld inverted"):
        margins(grid)


@pytest.mark.slow
def test_the_study_runs_its_grid_per_seed_pair_and_writes_its_report(tmp_path, monkeypatch, capsys):
    """End to end on a small grid (two betas, one DUO seed, two prompt seeds, 4 prompts, 10 steps):
    the cells are the demo's, each seed pair gets its own prompts, the report names every finding."""
    from unlearn_exp.toy import study

    monkeypatch.chdir(tmp_path)
    small = [
        "benchmark.n=4",
        "pp.prompts.n=4",
        "sampling.steps=10",
        "inversion.steps=3",
        "inversion.image_set.n_images=2",
        f"paths.root_dir={tmp_path}",
        f"paths.output_root={tmp_path}",
    ]
    argv = [
        "--duo-seeds",
        "42",
        "--prompt-seeds",
        "0,1",
        "--betas",
        "500,1000",
        "--out",
        str(tmp_path / "r"),
        *small,
    ]
    assert study.main(argv) == 0
    cells = pd.read_csv(tmp_path / "r" / "study.csv")
    # per beta the grid's 7 cells and the explicit prompts' unguided cell
    assert len(cells) == 2 * 2 * 8 and set(cells.prompt_seed) == {0, 1}
    assert cells.groupby("prompt_seed").cell_key.nunique().tolist() == [16, 16]
    assert (cells.benchmark == "toy_explicit").sum() == 4
    text = (tmp_path / "r" / "study.md").read_text()
    for finding in ("(0)", "(a)", "(b)", "(c)"):
        assert finding in text
    assert "seed pairs where it holds" in text
