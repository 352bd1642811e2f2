"""A run prints results, progress and real warnings: no library chatter (unlearn_exp/quiet.py)."""

from __future__ import annotations

import logging
import re
import warnings

import pytest
import torch

from tests.helpers import run_app, toy_overrides
from unlearn_exp.quiet import CHECKPOINT_CONNECTOR, INFO_LOGGERS, LIGHTNING_LOGGERS, quiet_lightning

# lines that are never a result, progress or a real warning
NOISE = (
    "kept in float32",  # diffusers, on every dtype cast
    "💡 Tip",
    "litmodels",
    "litlogger",
    "module(s) in eval mode",
    "GPU available",
    "TPU available",
    "HPU available",
    "LOCAL_RANK",
    "weights_only",
    "Restoring states from the checkpoint",
    "`Trainer.fit` stopped",
)


def noise_in(text: str) -> list[str]:
    """Lines of ``text`` that are known noise, or Lightning's own console format (a line printed
    twice: once by Lightning's handler, once by the run's)."""
    return [
        line
        for line in text.splitlines()
        if any(n in line for n in NOISE)
        or line.startswith(("INFO: ", "WARNING: "))
        or ("][lightning" in line and "][INFO]" in line)
    ]


@pytest.fixture
def lightning_logging():
    """Restore the Lightning loggers as they were (``quiet_lightning`` changes them process-wide)."""
    loggers = [logging.getLogger(n) for n in (*LIGHTNING_LOGGERS, *INFO_LOGGERS, CHECKPOINT_CONNECTOR)]
    saved = {lg.name: (list(lg.handlers), lg.propagate, lg.level, list(lg.filters)) for lg in loggers}
    yield
    for n, (handlers, propagate, level, filters) in saved.items():
        lg = logging.getLogger(n)
        lg.handlers[:], lg.propagate, lg.filters[:] = handlers, propagate, filters
        lg.setLevel(level)


def test_lightning_records_go_out_once_and_its_info_lines_not_at_all(lightning_logging):
    import lightning  # noqa: F401 - adds its own console handler

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    root, keep = logging.getLogger(), Keep(logging.INFO)
    root.addHandler(keep)
    try:
        quiet_lightning()
        quiet_lightning()  # idempotent
        assert not [
            h
            for n in LIGHTNING_LOGGERS
            for h in logging.getLogger(n).handlers
            if type(h) is logging.StreamHandler
        ]
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False, used: False")
        logging.getLogger(CHECKPOINT_CONNECTOR).info("`weights_only` was not set, defaulting to `False`.")
        logging.getLogger("lightning.pytorch.accelerators.cuda").info(
            "LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: [0]"
        )
        logging.getLogger("lightning.pytorch.utilities.rank_zero").warning("a real warning")
    finally:
        root.removeHandler(keep)
    assert seen == ["a real warning"]


def test_only_lightnings_inapplicable_warnings_are_ignored(lightning_logging):
    """The three named warnings from Lightning's modules are ignored; the same text from elsewhere, and
    any other warning, still shows (no blanket filter, in a run or in the demo)."""
    from unlearn_exp import demo

    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        demo.quiet_logs()
        assert ("ignore", None, Warning, None, 0) not in warnings.filters  # no blanket silence
        before = list(warnings.filters)
        quiet_lightning()  # each Trainer calls it: the filters are not changed again
        assert warnings.filters == before
        text = "Found 12 module(s) in eval mode at the start of training. This may lead to ..."
        warnings.warn_explicit(text, UserWarning, "fit_loop.py", 1, module="lightning.pytorch.loops.fit_loop")
        warnings.warn_explicit(text, UserWarning, "mine.py", 1, module="mine")
        warnings.warn_explicit("something else", UserWarning, "fit_loop.py", 2, module="lightning.pytorch.x")
    assert [str(w.message)[:12] for w in got] == ["Found 12 mod", "something el"]


@pytest.mark.slow
def test_a_toy_cell_that_trains_duo_and_c_star_prints_no_library_chatter(tmp_path):
    """``python -m unlearn_exp``, a cell that trains DUO (2 steps on 2 pairs) and learns C* with
    Lightning (3 steps): its result and progress lines, and no known noise."""
    over = toy_overrides(
        tmp_path,
        "guidance=sld",
        "embedding=inverted",
        "+debug=default",  # a recipe the shipped cache lacks: DUO trains
        "debug.train_steps=2",
        "debug.n_pairs=2",
        "debug.sample_steps=4",
        "checkpoint.batch=1",
        "checkpoint.checkpoint_every=1",
        "inversion.steps=3",
        "inversion.eval_draws=0",
        "inversion.image_set.n_images=2",
        "inversion.log_every_n_steps=1",
    )
    proc = run_app(*over)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert re.search(r"cell \w+: DSR [0-9.]+ .* on 4 images", out), out[-3000:]
    assert "DUO training" in out and "concept inversion (C*): 3/3 step done" in out
    assert noise_in(out) == [], out


class _Interrupt(Exception):
    pass


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_resumed_training_reads_its_checkpoint_with_weights_only_and_says_nothing_of_it(
    tmp_path, monkeypatch, recwarn, caplog, lightning_logging
):
    import lightning as L

    from unlearn_exp.config import preset
    from unlearn_exp.models import build_tiny
    from unlearn_exp.unlearning.duo import train_adapter

    class StopAt(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 1:
                raise _Interrupt()

    g = torch.Generator().manual_seed(0)
    unsafe, safe = torch.rand(2, 3, 16, 16, generator=g), -torch.rand(2, 3, 16, 16, generator=g)
    hp = preset("checkpoint", "duo", beta=500, steps=2, batch=1, rank=2, alpha=2, checkpoint_every=1, seed=3)
    hp = {**hp, "lr_override": 2e-3, "lambda_override": 10.0}
    with pytest.raises(_Interrupt):
        train_adapter(
            build_tiny(),
            (unsafe, safe),
            hp,
            adapter_name="duo_r",
            work_dir=tmp_path / "w",
            callbacks=[StopAt()],
        )
    last = tmp_path / "w" / "checkpoints" / "last.ckpt"
    torch.load(last, weights_only=True)  # tensors and plain values only

    loads: list = []
    real_load = torch.load

    def spy(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    recwarn.clear()
    with caplog.at_level(logging.INFO):
        info = train_adapter(
            build_tiny(),
            (unsafe, safe),
            hp,
            adapter_name="duo_r",
            work_dir=tmp_path / "w",
            out_dir=tmp_path / "o",
        )
    assert info["resumed_from_step"] == 1 and info["steps"] == 2
    assert loads == [True]
    assert not [w for w in recwarn if "weights_only" in str(w.message) or "eval mode" in str(w.message)]
    assert noise_in(caplog.text) == [], caplog.text
    assert "resuming from" in caplog.text  # our own line says so, once
