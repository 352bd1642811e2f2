"""The W&B comparison workspace: panel definitions as plain data, converted offline (no network)."""

from __future__ import annotations

import json

import pytest

from unlearn_exp import dashboard, paper
from unlearn_exp.errors import UserError


def test_spec_has_dsr_pp_scatter_per_beta_and_bars_per_axis():
    spec = dashboard.dashboard_spec("nudity_duo")
    assert [v["name"] for v in spec] == ["nudity_duo, all betas"] + [
        f"nudity_duo, beta {b}" for b in paper.BETAS
    ]
    overview, *per_beta = spec
    assert overview["filters"] == "Metric('Group') == 'nudity_duo'"
    assert overview["groupby"] == ["checkpoint.beta", "guidance.name", "embedding.source"]
    for view, beta in zip(per_beta, paper.BETAS):
        assert view["filters"] == f"Metric('Group') == 'nudity_duo' and Config('checkpoint.beta') == {beta}"
        assert view["groupby"] == ["guidance.name", "embedding.source"]  # one group per method
        panels = [p for s in view["sections"] for p in s["panels"]]
        scatters = [p for p in panels if p["kind"] == "scatter"]
        assert scatters == [
            {"kind": "scatter", "title": f"DSR against PP, beta={beta} (method)", "x": "pp_coco", "y": "dsr"}
        ]
        bars = {(p["metrics"][0], p["groupby"]) for p in panels if p["kind"] == "bar"}
        assert bars == {(m, g) for m in ("dsr", "pp_coco") for g in ("guidance.name", "embedding.source")}
    assert dashboard.dashboard_spec("x", pp="pp_bench")[1]["sections"][0]["panels"][0]["x"] == "pp_bench"
    with pytest.raises(UserError):
        dashboard.dashboard_spec("x", pp="lpips")
    json.dumps(spec)  # plain data


def test_spec_converts_to_wandb_workspaces_offline():
    from wandb_workspaces.expr import expr_to_filters

    def leaves(f):
        if f.filters is None:
            return [(f.key.section, f.key.name, f.op, f.value)]
        return [x for g in f.filters for x in leaves(g)]

    spec = dashboard.dashboard_spec("violence_duo", betas=[1000])
    # the filter strings parse into W&B's filter tree: run group, then the config's beta
    assert leaves(expr_to_filters(spec[0]["filters"])) == [("run", "group", "=", "violence_duo")]
    assert leaves(expr_to_filters(spec[1]["filters"])) == [
        ("run", "group", "=", "violence_duo"),
        ("config", "checkpoint.beta", "=", 1000),
    ]
    views = dashboard.build_workspaces(spec, "my-team", "unlearn-exp")
    assert [w.name for w in views] == ["violence_duo, all betas", "violence_duo, beta 1000"]
    w = views[1]
    assert [type(p).__name__ for s in w.sections for p in s.panels] == ["ScatterPlot"] + ["BarPlot"] * 4
    scatter = w.sections[0].panels[0]
    assert (scatter.x.name, scatter.y.name) == ("pp_coco", "dsr")
    assert [g.name for g in w.runset_settings.groupby] == ["guidance.name", "embedding.source"]
    model = w._to_model()  # the exact structure save() would upload, built without network
    assert model.display_name == "violence_duo, beta 1000"


def test_cli_dry_run_and_offline_refusal(capsys, monkeypatch):
    assert dashboard.main(["--experiment", "toy_duo", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == "toy_duo, all betas"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert dashboard.main(["--entity", "e", "--experiment", "toy_duo"]) == 2
    assert "wandb sync" in capsys.readouterr().err


def test_cli_help_explains_every_option_and_dry_run_writes_the_spec(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit):
        dashboard.main(["--help"])
    text = capsys.readouterr().out
    for option in ("--entity", "--project", "--experiment", "--pp", "--dry-run", "--spec-out"):
        assert option in text
    assert "(default: unlearn-" in text and "one view per experiment" in text
    out = tmp_path / "spec.json"
    assert dashboard.main(["--experiment", "toy_duo", "--dry-run", "--spec-out", str(out)]) == 0
    assert json.loads(out.read_text())[0]["name"] == "toy_duo, all betas"
