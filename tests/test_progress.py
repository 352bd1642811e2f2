"""No silent stage: labelled bars on a terminal, periodic log lines elsewhere, one switch."""

from __future__ import annotations

import logging

import pytest

from unlearn_exp import progress


def test_log_lines_name_the_stage_with_rate_and_eta(monkeypatch, caplog):
    progress.configure("off")
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="unlearn_exp"):
        with progress.stage_bar("DUO pairs (Nudity)", 64, "img") as bar:
            bar.update(12, loss=0.5)
            bar.update(4, loss=0.3)
    lines = [r.getMessage() for r in caplog.records]
    assert (
        lines[0].startswith("DUO pairs (Nudity): 12/64 img (")
        and "ETA" in lines[0]
        and "loss 0.5" in lines[0]
    )
    assert lines[-1].startswith("DUO pairs (Nudity): 16/64 img done (")
    assert "loss 0.49" in lines[-1]  # smoothed, not the raw last value


def test_switch_and_tty_default(monkeypatch):
    progress.configure("on")
    assert progress.bars_on()
    progress.configure(False)
    assert not progress.bars_on()
    progress.configure("auto")
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    assert not progress.bars_on()
    with pytest.raises(Exception, match="progress must be one of"):
        progress.configure("loud")


def test_sampling_and_training_report_labelled_progress(tiny, caplog, tmp_path):
    from unlearn_exp.sampling import predict_rows

    progress.configure("off")
    rows = [{"case_id": str(i), "prompt": "a cat", "seed": i, "image_index": 0} for i in range(3)]
    with caplog.at_level(logging.INFO, logger="unlearn_exp"):
        predict_rows(tiny, None, rows, batch_size=2, steps=2, label="sampling my_set x duo x sld+C*")
    assert any(
        r.getMessage().startswith("sampling my_set x duo x sld+C*: 3/3 img done") for r in caplog.records
    )
