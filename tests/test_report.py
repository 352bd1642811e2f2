"""The report from a fixture of cell rows: tables cell for cell, "-" where rows are missing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from unlearn_exp import paper, report
from unlearn_exp.errors import UserError
from unlearn_exp.evaluation.dsr import wilson_interval


def _row(
    experiment,
    task,
    beta,
    guidance,
    embedding,
    n_safe,
    n,
    pp,
    *,
    scale="sd14",
    bench=None,
    key=None,
    extra=(),
):
    """A cell row whose identity is the one the experiment's config gives (``extra``: overrides
    that make it another cell, e.g. a debug run or the user's own prompt file)."""
    pos = report.position(report.cell_overrides(experiment, beta, guidance, embedding), tuple(extra))
    return {
        "spec_key": pos.key,
        "spec_json": json.dumps(pos.spec),
        "created_at": "2026-01-01T00:00:00+00:00",
        "experiment": experiment,
        "task": task,
        "scale": scale,
        "model_id": f"{scale}-model",
        "checkpoint_method": "duo",
        "beta": float(beta),
        "checkpoint_id": f"duo-{task}-{beta}",
        "guidance": guidance,
        "embedding": embedding,
        "embedding_id": f"emb-{embedding}-{beta}",
        "dsr": n_safe / n,
        "dsr_lo": wilson_interval(n_safe, n)[0],
        "dsr_hi": wilson_interval(n_safe, n)[1],
        "n_images": n,
        "n_safe": n_safe,
        "pp_coco": pp,
        "pp_bench": pp - 0.1 if bench is None else bench,
        "benign_acc": math.nan,
        "judge_profile": "q16" if task == "violence" else "nudenet_duo",
        "judge_hash": "jh-" + task,
        "cell_key": key or f"{experiment}-{task}-{beta}-{guidance}-{embedding}-{n}",
        "config_json": "{}",
    }


def fixture_rows() -> pd.DataFrame:
    rows = [
        # violence, main beta 1000: three of five methods present
        _row("violence_duo", "violence", 1000, "none", "inverted", 460, 750, 0.8),  # embedding ignored
        _row("violence_duo", "violence", 1000, "sld", "explicit", 600, 750, 0.75),
        _row("violence_duo", "violence", 1000, "safree", "inverted", 700, 750, 0.7),
        # nudity, main beta 2000: all five; a debug run of DUO+SLD is another cell and stays out
        _row("nudity_duo", "nudity", 2000, "none", "explicit", 40, 95, 0.81),
        _row("nudity_duo", "nudity", 2000, "sld", "explicit", 46, 95, 0.777),
        _row("nudity_duo", "nudity", 2000, "sld", "explicit", 4, 4, 0.99, extra=("+debug=default",)),
        _row("nudity_duo", "nudity", 2000, "sld", "inverted", 90, 95, 0.7),
        _row("nudity_duo", "nudity", 2000, "safree", "explicit", 50, 95, 0.68),
        _row("nudity_duo", "nudity", 2000, "safree", "inverted", 91, 95, 0.6),
        _row("nudity_duo", "nudity", 500, "sld", "inverted", 93, 95, 0.65),
        # transfer: shared C* on beta 250 (SLD) from the transfer experiment, 2000 (SAFREE) from the main one
        _row("nudity_duo_transfer", "nudity", 250, "sld", "shared", 931, 931, 0.7),
        _row(
            "nudity_duo", "nudity", 2000, "safree", "shared", 882, 931, 0.6, extra=("benchmark=i2p_sexual",)
        ),
        # other scale: must not leak into the sd14 tables
        _row("toy_duo", "toy", 2000, "none", "explicit", 10, 10, 0.5, scale="toy"),
        # a user's own prompt file under a grid position's labels: another cell
        _row(
            "nudity_duo",
            "nudity",
            2000,
            "none",
            "explicit",
            1,
            95,
            0.1,
            extra=("benchmark=prompts_file", "benchmark.path=/data/my.csv"),
            key="my_custom",
        ),
    ]
    return pd.DataFrame(rows)


def _fmt(table):
    return report.formatted(table).set_index(table.columns[0].header)


@pytest.mark.slow
def test_main_tables_cell_for_cell():
    tables = report.build_tables(fixture_rows(), "sd14")
    assert set(tables) == {
        "main_violence_beta1000",
        "long_violence",
        "main_nudity_beta2000",
        "long_nudity",
        "transfer",
        "other_cells",
    }

    v = _fmt(tables["main_violence_beta1000"])
    assert list(v.index) == list(paper.METHODS)
    # DUO: 460/750 = 0.6133 vs paper 0.613 -> +0.000; PP 0.800 vs 0.820 -> -0.020
    assert v.loc[
        "DUO", ["DSR", "DSR (paper)", "DSR diff", "PP (COCO)", "PP (paper)", "PP diff", "N"]
    ].tolist() == [
        "0.613",
        "0.613",
        "+0.000",
        "0.800",
        "0.820",
        "-0.020",
        "750",
    ]
    assert v.loc["DUO", "DSR 95% CI"] == "[0.578, 0.648]"  # Wilson 95% of 460/750
    assert v.loc["DUO+SLD", ["DSR", "DSR diff", "PP diff"]].tolist() == ["0.800", "+0.040", "-0.034"]
    assert v.loc["DUO+SAFREE+Ours", ["DSR", "DSR (paper)", "DSR diff"]].tolist() == [
        "0.933",
        "0.947",
        "-0.014",
    ]
    # missing cells: ours and the differences are "-", the paper's numbers stay
    for m in ("DUO+SLD+Ours", "DUO+SAFREE"):
        assert v.loc[m, ["DSR", "DSR diff", "PP (COCO)", "PP diff", "N", "DSR 95% CI"]].tolist() == ["-"] * 6
    assert v.loc["DUO+SAFREE", "DSR (paper)"] == "0.793"

    n = _fmt(tables["main_nudity_beta2000"])
    # the 95-image DUO+SLD row is the position's cell; the debug row is another cell
    assert n.loc["DUO+SLD", ["DSR", "DSR (paper)", "DSR diff", "PP (COCO)", "PP diff", "N"]].tolist() == [
        "0.484",
        "0.484",
        "+0.000",
        "0.777",
        "+0.000",
        "95",
    ]
    assert n.loc["DUO", ["DSR", "DSR diff"]].tolist() == ["0.421", "-0.021"]
    assert n.loc["DUO+SAFREE+Ours", ["DSR", "DSR diff", "PP (COCO)", "PP diff"]].tolist() == [
        "0.958",
        "+0.011",
        "0.600",
        "-0.032",
    ]
    assert n["Benign acc."].tolist() == ["-"] * 5


def test_long_form_and_transfer():
    tables = report.build_tables(fixture_rows(), "sd14")
    long = report.formatted(tables["long_nudity"])
    assert len(long) == len(paper.BETAS) * len(paper.METHODS)
    at = long.set_index(["beta", "Method"])
    # beta 500: ours present, no paper number at that beta
    assert at.loc[
        ("500", "DUO+SLD+Ours"), ["DSR", "DSR (paper)", "DSR diff", "PP (COCO)", "PP (bench)"]
    ].tolist() == [
        "0.979",
        "-",
        "-",
        "0.650",
        "0.550",
    ]
    assert at.loc[("250", "DUO"), "DSR"] == "-"
    assert at.loc[("2000", "DUO+SLD"), "DSR (paper)"] == "0.484"

    t = report.formatted(tables["transfer"]).set_index("beta")
    assert list(t.index) == ["250", "1000", "2000"]
    assert t.loc["250"].tolist() == ["1.000", "1.000", "+0.000", "-", "0.990", "-"]
    assert t.loc["1000"].tolist() == ["-", "0.990", "-", "-", "0.990", "-"]
    assert t.loc["2000"].tolist() == ["-", "0.905", "-", "0.947", "0.968", "-0.021"]


def test_missing_cells_lists_exactly_the_absent_ones():
    rows = fixture_rows()
    cells = report.missing_cells(rows, "sd14")
    as_text = {" ".join(c) for c in cells}
    # 2 tasks x 4 betas x 5 methods + 3 betas x 2 transfer methods, minus the rows present
    present_main = 3 + 5 + 1
    present_transfer = 2
    assert len(cells) == 2 * 4 * 5 - present_main + 3 * 2 - present_transfer
    assert "+experiment=violence_duo checkpoint.beta=1000 guidance=sld embedding=inverted" in as_text
    assert "+experiment=violence_duo checkpoint.beta=1000 guidance=none embedding=explicit" not in as_text
    assert "+experiment=nudity_duo checkpoint.beta=250 guidance=none embedding=explicit" in as_text
    assert "+experiment=nudity_duo_transfer checkpoint.beta=1000 guidance=safree embedding=shared" in as_text
    assert (
        "+experiment=nudity_duo_transfer checkpoint.beta=2000 guidance=safree embedding=shared" not in as_text
    )
    # grouped into multiruns over beta
    cmds = report.sweep_commands(cells, ["model.path=/w"])
    assert all(c[2:4] == ["unlearn_exp", "--multirun"] and c[-1] == "model.path=/w" for c in cmds)
    assert sum(len(next(o for o in c if o.startswith("checkpoint.beta=")).split(",")) for c in cmds) == len(
        cells
    )
    # the toy scale asks for its own experiment
    toy = report.missing_cells(rows, "toy")
    assert all(c[0] == "+experiment=toy_duo" for c in toy)
    assert len(toy) == 4 * 5 - 1 + 6


@pytest.mark.slow
def test_write_report_files(tmp_path: Path):
    d = tmp_path / "results" / "job0"
    d.mkdir(parents=True)
    fixture_rows().to_parquet(d / "cells.parquet")
    rows = report.load_cells([tmp_path / "results"])
    assert len(rows) == len(fixture_rows())
    written = report.write_report(
        rows, "sd14", tmp_path / "reports", report.find_cell_files([tmp_path / "results"])
    )
    out = tmp_path / "reports" / "sd14"
    names = {p.name for p in written}
    for stem in (
        "main_violence_beta1000",
        "main_nudity_beta2000",
        "long_violence",
        "long_nudity",
        "transfer",
    ):
        assert {f"{stem}.md", f"{stem}.tex", f"{stem}.csv"} <= names
    assert {"dsr_pp_violence.png", "dsr_pp_nudity.png", "sources.md"} <= names
    assert (out / "dsr_pp_nudity.png").read_bytes()[:4] == b"\x89PNG"
    # a plot of the same points is kept as drawn; other points draw it again
    plot = out / "dsr_pp_nudity.png"
    tables = report.build_tables(rows, "sd14")
    from unlearn_exp.report.render import plot_dsr_pp

    stamp = plot.stat().st_mtime_ns
    assert plot_dsr_pp(tables["long_nudity"], "nudity", out) == plot and plot.stat().st_mtime_ns == stamp
    tables["long_nudity"].data.loc[0, "dsr"] = 0.123
    plot_dsr_pp(tables["long_nudity"], "nudity", out)
    assert plot.stat().st_mtime_ns != stamp
    md = (out / "main_violence_beta1000.md").read_text()
    assert "| DUO+SLD+Ours | - | 0.880 | - | - | 0.693 | - | - | - | - | - | - |" in md
    tex = (out / "main_violence_beta1000.tex").read_text()
    assert r"\begin{tabular}{lrrrrrrrrrll}" in tex and r"$\Delta$DSR" in tex
    csv = pd.read_csv(out / "main_nudity_beta2000.csv", keep_default_na=False, dtype=str)
    assert csv.loc[csv.method == "DUO+SLD", "dsr"].item() == "0.4842"
    assert csv.loc[csv.method == "DUO+SLD", "dsr_paper"].item() == "0.4840"
    vcsv = pd.read_csv(out / "main_violence_beta1000.csv", keep_default_na=False, dtype=str)
    assert vcsv.loc[vcsv.method == "DUO+SAFREE", "dsr"].item() == "-"
    src = (out / "sources.md").read_text()
    assert "| nudity | nudenet_duo | jh-nudity |" in src and "| violence | q16 | jh-violence |" in src
    assert "my_custom" not in src and "toy-model" not in src
    other = (out / "other_cells.md").read_text()
    assert "my_custom" in other and "benchmark." in other and "sampling.steps" in other


def test_toy_scale_uses_toy_rows(tmp_path: Path):
    rows = fixture_rows()
    tables = report.build_tables(rows, "toy")
    assert set(tables) == {"main_toy_beta2000", "long_toy", "transfer", "other_cells"}
    t = _fmt(tables["main_toy_beta2000"])
    assert t.loc["DUO", ["DSR", "PP (toy_benign)"]].tolist() == ["1.000", "0.500"]
    assert "DSR (paper)" not in t.columns and "PP diff" not in t.columns  # no paper numbers on the toy
    assert t.loc["DUO+SLD", "DSR"] == "-"
    # no toy rows at all: the tables still exist, all "-"
    empty = report.build_tables(rows[rows.scale == "sd14"], "toy")
    assert (report.formatted(empty["main_toy_beta2000"]).drop(columns="Method") == "-").all().all()


def test_cli_no_run_and_bad_input(tmp_path: Path, capsys):
    d = tmp_path / "r"
    d.mkdir()
    fixture_rows().to_parquet(d / "cells.parquet")
    rc = report.main(["--scale", "sd14", "--results", str(d), "--out", str(tmp_path / "rep"), "--no-run"])
    assert rc == 0 and (tmp_path / "rep" / "sd14" / "transfer.md").is_file()
    assert "cell(s) without rows" in capsys.readouterr().out
    bad = tmp_path / "bad"
    bad.mkdir()
    fixture_rows().drop(columns=["dsr"]).to_parquet(bad / "cells.parquet")
    with pytest.raises(UserError, match="lack the column"):
        report.load_cells([bad])
    rc = report.main(["--scale", "sd14", "--results", str(bad), "--out", str(tmp_path / "rep2"), "--no-run"])
    assert rc == 2 and not (tmp_path / "rep2").exists()
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.slow
def test_preflight_stops_without_weights(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(UserError, match=r"model\.path.*make demo"):
        report.preflight("sd14", [f"model.path={tmp_path / 'absent'}"])
    with pytest.raises(UserError, match="model.path"):
        report.preflight("sd14", ["model.path=nobody/not-a-cached-model"])
    # a folder with the diffusers layout passes (loading itself is the model loader's job)
    for sub in ("unet", "text_encoder", "tokenizer", "scheduler"):
        (tmp_path / "sd" / sub).mkdir(parents=True)
    with pytest.raises(UserError, match="vae"):
        report.preflight("sd14", [f"model.path={tmp_path / 'sd'}"])
    (tmp_path / "sd" / "vae").mkdir()
    # the weights are there: every other file the tasks need is named at once, per task
    with pytest.raises(UserError, match=r"sd14: 2 file\(s\) are missing: LPIPS AlexNet trunk.*CLIP ViT-L/14"):
        report.preflight("sd14", [f"model.path={tmp_path / 'sd'}"])
    trunk = tmp_path / "torch" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    trunk.parent.mkdir(parents=True)
    trunk.write_bytes(b"x")
    report.preflight("sd14", [f"model.path={tmp_path / 'sd'}"], task="nudity")  # Q16's CLIP is violence's
    with pytest.raises(UserError, match=r"violence: 1 file\(s\) are missing: CLIP"):
        report.preflight("sd14", [f"model.path={tmp_path / 'sd'}"], task="violence")


def test_reproduce_table_by_task_nudity_first(tmp_path: Path):
    rows = fixture_rows()
    nudity = report.missing_cells(rows, "sd14", task="nudity")
    assert {c[0] for c in nudity} == {"+experiment=nudity_duo", "+experiment=nudity_duo_transfer"}
    both = report.missing_cells(rows, "sd14")
    assert both[: len(nudity)] == nudity and {c[0] for c in both[len(nudity) :]} == {
        "+experiment=violence_duo"
    }
    with pytest.raises(UserError, match="--task must be one of"):
        report.missing_cells(rows, "sd14", task="nudityy")
    d = tmp_path / "r"
    d.mkdir()
    rows.to_parquet(d / "cells.parquet")
    argv = ["--scale", "sd14", "--results", str(d), "--out", str(tmp_path / "rep"), "--no-run"]
    assert report.main([*argv, "--task", "violence"]) == 0


def test_run_missing_reports_failure():
    seen = []
    report.run_missing(
        [["+experiment=nudity_duo", "checkpoint.beta=250", "guidance=none", "embedding=explicit"]],
        [],
        lambda c: seen.append(c) or 0,
    )
    assert seen and seen[0][-1] == "checkpoint.beta=250"
    with pytest.raises(UserError, match="failed"):
        report.run_missing(
            [["+experiment=x", "checkpoint.beta=1", "guidance=none", "embedding=explicit"]], [], lambda c: 3
        )


def test_rows_without_optional_columns_still_tabulate():
    rows = pd.DataFrame([_row("nudity_duo", "nudity", 2000, "none", "none", 42, 95, 0.8)])
    tables = report.build_tables(rows.drop(columns=["benign_acc"]), "sd14")
    main = report.formatted(tables["main_nudity_beta2000"])
    assert "0.442" in main.to_string()  # no KeyError for the optional benign accuracy


# the decoys of test_decoy_cells_never_change_a_table: cell key -> ``_row``'s positional arguments
DECOY_ROWS = {
    "decoy-file": ("nudity_duo", "nudity", 2000, "none", "explicit", 95, 95, 0.9),
    "decoy-sampler": ("nudity_duo", "nudity", 2000, "sld", "explicit", 90, 95, 0.9),
    "decoy-judge": ("violence_duo", "violence", 1000, "none", "explicit", 700, 750, 0.9),
    "decoy-more-images": ("nudity_duo", "nudity", 2000, "safree", "inverted", 950, 950, 0.9),
    "decoy-lora": ("nudity_duo", "nudity", 500, "none", "explicit", 95, 95, 1.0),
}
# ... and the overrides that set each apart (``_row``'s ``extra``), in the same order
DECOY_EXTRAS = {
    "decoy-file": ("benchmark=prompts_file", "benchmark.path=/data/other.csv"),
    "decoy-sampler": ("sampling.steps=20",),
    "decoy-judge": ("judge=nudenet_duo",),
    "decoy-more-images": ("benchmark.images_per_prompt=10",),
    "decoy-lora": ("checkpoint.path=/w/lora.safetensors",),
}


@pytest.mark.slow
def test_decoy_cells_never_change_a_table():
    """A results folder holding the grid plus decoys (another prompt file, another sampler, another
    judge, more images, a LoRA file under the default beta) gives the same tables as the grid alone;
    the decoys are listed under 'other cells' with what sets them apart."""
    grid = fixture_rows()
    decoys = pd.DataFrame([_row(*DECOY_ROWS[k], key=k, extra=extra) for k, extra in DECOY_EXTRAS.items()])
    alone = report.build_tables(grid, "sd14")
    mixed = report.build_tables(pd.concat([grid, decoys], ignore_index=True), "sd14")
    for name, table in alone.items():
        if name != "other_cells":
            pd.testing.assert_frame_equal(report.formatted(table), report.formatted(mixed[name]))
    other = report.formatted(mixed["other_cells"]).set_index("Cell")
    assert set(decoys.cell_key) <= set(other.index)
    differs = other["Differs from the grid in"]
    assert "benchmark." in differs["decoy-file"] and differs["decoy-sampler"] == "sampling.steps"
    assert differs["decoy-judge"].startswith("judge.")
    assert differs["decoy-more-images"] == "benchmark.images_per_prompt"
    assert "checkpoint.files" in differs["decoy-lora"]
    # the CSV's columns in the table's order on every run (not a set's order, which varies by process)
    assert list(mixed["other_cells"].data.columns) == [
        "experiment",
        "checkpoint",
        "guidance",
        "embedding",
        "benchmark",
        "n_images",
        "dsr",
        "pp_coco",
        "differs",
        "cell_key",
        "dsr_lo",
        "dsr_hi",
    ]


@pytest.mark.slow
def test_paper_numbers_are_checked_against_our_n():
    assert paper.attainable(0.484, 95) and not paper.attainable(0.990, 95) and paper.attainable(0.990, 931)
    assert 95 in paper.consistent_ns([0.442, 0.484, 0.937, 0.568, 0.947])
    assert 931 in paper.consistent_ns([1.0, 0.990, 0.905, 0.968])
    assert paper.n_note("DSR", [0.442, 0.484], 95) is None
    note = paper.n_note("DSR", [1.0, 0.990, 0.905, 0.968], 95)
    assert "0.990 cannot be k/95" in note and "i2p_sexual (N=931)" in note
    # the transfer experiment runs on the 931-prompt set, so its table carries no note; one
    # override away (the 95-prompt set) the note appears
    tables = report.build_tables(fixture_rows(), "sd14")
    assert tables["transfer"].notes == [] and tables["main_nudity_beta2000"].notes == []
    nudity95 = report.build_tables(fixture_rows(), "sd14", extra=["benchmark=i2p_nudity"])
    assert any("0.990 cannot be k/95" in n for n in nudity95["transfer"].notes)
    assert "0.990 cannot be k/95" in report.to_markdown(nudity95["transfer"])
    assert (
        report.position(report.cell_overrides("nudity_duo_transfer", 1000, "sld", "shared")).spec[
            "benchmark"
        ]["name"]
        == "i2p_sexual"
    )


def test_generated_attack_cells_add_their_column_to_the_long_table():
    """Cells of the toy grid on prompts generated against the model (benchmark=toy_ring_a_bell_generated)
    give the long table's "DSR (generated attacks)"; without such cells the column is absent."""
    gen = ("benchmark=toy_ring_a_bell_generated",)
    plain = [_row("toy_duo", "toy", 2000, "sld", "explicit", 40, 48, 0.9, scale="toy")]
    generated = _row("toy_duo", "toy", 2000, "sld", "explicit", 12, 48, 0.9, scale="toy", extra=gen)
    rows = pd.DataFrame(
        [{**r, "benchmark": "toy_indirect"} for r in plain]
        + [{**generated, "benchmark": "toy_ring_a_bell_generated"}]
    )
    tables = report.build_tables(rows, "toy")
    long = report.formatted(tables["long_toy"])
    at = long[(long["beta"] == "2000") & (long["Method"] == "DUO+SLD")]
    assert at[["DSR", "DSR (generated attacks)"]].values.tolist() == [["0.833", "0.250"]]
    assert tables["other_cells"].data.empty  # the generated cell has its place in the table
    without = report.build_tables(rows.iloc[:1], "toy")
    assert "DSR (generated attacks)" not in _fmt(without["long_toy"]).columns


def _crowded_long_table() -> report.Table:
    """A long table whose points nearly all sit at DSR 1.0 (as on the toy), paper points at one beta."""
    from unlearn_exp.report.tables import Column

    recs = []
    for i, beta in enumerate(paper.BETAS):
        for j, method in enumerate(paper.METHODS):
            dsr = 1.0 if (i, j) != (0, 0) else 0.75
            recs.append(
                {
                    "method": method,
                    "beta": beta,
                    "dsr": dsr,
                    "dsr_lo": dsr - 0.2,
                    "dsr_hi": 1.0,
                    "pp": 0.80 + 0.002 * j,
                    "dsr_paper": 0.9 if beta == 1000 else math.nan,
                    "pp_paper": 0.7 if beta == 1000 else math.nan,
                }
            )
    cols = [Column("method", "method", "method", "text"), Column("pp", "PP (COCO)", "PP (COCO)")]
    return report.Table("long_toy", "crowded", pd.DataFrame(recs), cols)


def test_dsr_pp_plot_keys_points_by_legend_not_by_labels_that_collide(tmp_path: Path):
    """Twenty points, nineteen at DSR 1.0: no text sits at a point; the legend has one entry per method,
    per beta and for the paper, beside the axes; no two texts of the figure overlap; the plot is
    cached under a key that names this layout."""
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from unlearn_exp.grids import png_key
    from unlearn_exp.report import render

    fig = render.dsr_pp_figure(_crowded_long_table(), "toy")
    try:
        fig.canvas.draw()
        ax = fig.axes[0]
        assert not ax.texts  # no per-point annotations
        legend = ax.get_legend()
        labels = [t.get_text() for t in legend.get_texts()]
        assert labels == [*paper.METHODS, *(f"beta={b}" for b in paper.BETAS), "paper"]
        renderer = fig.canvas.get_renderer()
        assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1  # beside
        texts = [
            t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip() and t.figure is not None
        ]
        boxes = [t.get_window_extent(renderer) for t in texts]
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                assert not boxes[i].overlaps(boxes[j]), (texts[i].get_text(), texts[j].get_text())
    finally:
        plt.close(fig)
    path = render.plot_dsr_pp(_crowded_long_table(), "toy", tmp_path)
    assert path.read_bytes()[:4] == b"\x89PNG" and png_key(path)
    stamp = path.stat().st_mtime_ns
    assert render.plot_dsr_pp(_crowded_long_table(), "toy", tmp_path) == path
    assert path.stat().st_mtime_ns == stamp


def test_an_override_of_a_swept_key_is_refused_not_applied_to_every_position(tmp_path: Path, capsys):
    """``-- checkpoint.beta=500`` would make every beta's position the beta-500 cell: refused in one line."""
    with pytest.raises(UserError, match="checkpoint.beta=500.*sweep"):
        report.position(report.cell_overrides("toy_duo", 250, "sld", "explicit"), ("checkpoint.beta=500",))
    with pytest.raises(UserError, match="guidance"):
        report.position(report.cell_overrides("toy_duo", 250, "none", None), ("guidance=sld",))
    with pytest.raises(UserError, match="checkpoint=esd"):  # the group that holds a swept key
        report.position(report.cell_overrides("toy_duo", 250, "none", None), ("checkpoint=esd",))
    # a key the positions do not set still applies to all of them (a debug run is its own cells), and
    # another option of the same method keeps each position's meaning (the paper's DUO on the toy)
    assert report.position(report.cell_overrides("toy_duo", 250, "none", None), ("+debug=default",)).key
    pos = report.position(report.cell_overrides("toy_duo", 250, "sld", "explicit"), ("checkpoint=duo",))
    assert pos.spec["checkpoint"]["beta"] == 250 and "beta_map" not in pos.spec["checkpoint"]
    d = tmp_path / "r"
    d.mkdir()
    fixture_rows().to_parquet(d / "cells.parquet")
    argv = ["--scale", "toy", "--results", str(d), "--out", str(tmp_path / "rep"), "--no-run"]
    assert report.main([*argv, "checkpoint.beta=500"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint.beta" in err and not (tmp_path / "rep").exists()
