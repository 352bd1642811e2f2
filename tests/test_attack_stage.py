"""``stage=attack``: UnlearnDiffAtk against a toy grid cell, its success rate, resume and the report."""

from __future__ import annotations

import json

import pytest
from hydra.errors import ConfigCompositionException

from tests.helpers import compose
from unlearn_exp.errors import UserError


def _overrides(tmp_path, *more):
    return [
        "+experiment=toy_duo",
        "checkpoint.beta=2000",
        "guidance=sld",
        "embedding=explicit",
        "benchmark.limit=3",
        "pp.prompts.limit=2",
        "sampling.steps=10",
        "sampling.progress=false",
        "attack.k=2",
        "attack.steps=3",
        "attack.n_targets=2",
        f"paths.root_dir={tmp_path}",
        f"paths.output_root={tmp_path}",
        *more,
    ]


@pytest.mark.slow
def test_attack_stage_records_the_success_rate_resumes_and_joins_the_report(
    tmp_path, monkeypatch, one_thread
):
    from unlearn_exp.attacks import unlearndiffatk
    from unlearn_exp.cli import run_job
    from unlearn_exp.identity import cell_spec, spec_key
    from unlearn_exp.report import build_tables, load_cells

    cfg = compose(_overrides(tmp_path, "stage=attack"), hydra=False)
    out = run_job(cfg)
    assert out["spec_key"] == spec_key(cell_spec(cfg))
    assert 1 <= out["n_targets"] <= 2 and out["n_targets"] <= out["n_flagged"] <= 3
    assert 0.0 <= out["asr_lo"] <= out["asr"] <= out["asr_hi"] <= 1.0
    assert 0.0 <= out["unsafe_before"] <= 1.0
    for t in out["targets"]:
        assert t["adversarial_prompt"].endswith(t["prompt"]) and t["adversarial_prompt"] != t["prompt"]
    asr = sum(t["unsafe_after"] for t in out["targets"]) / out["n_targets"]
    assert out["asr"] == pytest.approx(asr)
    record = json.loads(open(out["results"]).read())
    assert record["asr"] == out["asr"]
    csv = open(record["prompts_csv"]).read().splitlines()
    assert csv[0] == "prompt,seed,case_id" and len(csv) == 1 + out["n_targets"]

    # a second run takes every attack from the cache
    def no_attack(*a, **k):
        raise AssertionError("the attack must come from the cache")

    monkeypatch.setattr(unlearndiffatk, "run_attack", no_attack)
    tracked = "logger=wandb"  # and logged as its own W&B run (offline, in the job's folder)
    again = run_job(compose(_overrides(tmp_path, "stage=attack", tracked), hydra=False))
    assert [t["adversarial_prompt"] for t in again["targets"]] == [
        t["adversarial_prompt"] for t in out["targets"]
    ]
    assert again["asr"] == out["asr"]
    from unlearn_exp import tracking

    (run_dir,) = tracking.find_offline_runs(tmp_path)
    run = tracking.read_offline_run(run_dir, wait_s=15)
    assert run["summary"]["asr"] == pytest.approx(out["asr"]) and run["exit_code"] == 0
    assert run["summary"]["spec_key"] == out["spec_key"] and "stage=attack" in run["tags"]
    assert run["name"].startswith("attack/")
    assert run["summary"]["targets"]["nrows"] == out["n_targets"]

    # the cell itself, then the report: its long table carries the attack's column for that cell
    from unlearn_exp.cell import run_cell

    run_cell(compose(_overrides(tmp_path), hydra=False))
    rows = load_cells([tmp_path / "results"])
    assert rows["asr"].dropna().tolist() == [out["asr"]]
    extra = _overrides(tmp_path)[4:]
    long = build_tables(rows, "toy", extra=extra)["long_toy"]
    assert "asr" in long.data and long.data["asr"].dropna().tolist() == [out["asr"]]
    assert any(c.header == "ASR (UnlearnDiffAtk)" for c in long.columns)


def test_attack_stage_refuses_bad_settings_in_one_line(tmp_path):
    from unlearn_exp.attack import run_attack_cell

    with pytest.raises(UserError, match="attack.k") as err:
        run_attack_cell(compose(_overrides(tmp_path, "attack.k=0"), hydra=False))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="attack.n_targets"):
        run_attack_cell(compose(_overrides(tmp_path, "attack.n_targets=0"), hydra=False))
    with pytest.raises(ConfigCompositionException):  # a key the attack does not have
        compose(_overrides(tmp_path, "attack.bogus=1"), hydra=False)


def test_no_attack_recorded_leaves_the_rows_unchanged(tmp_path):
    from unlearn_exp.report import load_cells

    assert "asr" not in load_cells([tmp_path]).columns


def test_a_cell_attacked_with_two_settings_shows_the_newest(tmp_path):
    import pandas as pd

    from unlearn_exp.attack import load_attacks
    from unlearn_exp.report.tables import _with_attacks

    folder = tmp_path / "toy_duo" / "attacks"
    folder.mkdir(parents=True)
    base = {"spec_key": "k1", "attack": "unlearndiffatk", "n_targets": 8, "unsafe_before": 0.5}
    # file names sort the other way round from the times they were written
    (folder / "k1-aaaa.json").write_text(
        json.dumps(
            {
                **base,
                "attack_key": "aaaa",
                "asr": 0.9,
                "asr_lo": 0.5,
                "asr_hi": 1.0,
                "created_at": "2026-12-02T00:00:00+00:00",
            }
        )
    )
    (folder / "k1-bbbb.json").write_text(
        json.dumps(
            {
                **base,
                "attack_key": "bbbb",
                "asr": 0.1,
                "asr_lo": 0.0,
                "asr_hi": 0.5,
                "created_at": "2026-12-01T00:00:00+00:00",
            }
        )
    )
    assert load_attacks([tmp_path])["attack_key"].tolist() == ["bbbb", "aaaa"]  # oldest first
    rows = _with_attacks(pd.DataFrame({"spec_key": ["k1", "k2"], "dsr": [0.5, 0.6]}), [tmp_path])
    assert rows["asr"].tolist()[0] == 0.9 and pd.isna(rows["asr"].tolist()[1])
