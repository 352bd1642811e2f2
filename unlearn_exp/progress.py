"""Labelled progress for every long stage: a bar on a terminal, periodic log lines elsewhere.

``stage_bar(label, total, unit)`` is a context manager with ``update(n, loss=...)``: on a TTY a tqdm
bar with the rate, the ETA and a smoothed loss; elsewhere (CI, a Slurm log, a pipe) one log line
at most every ``LOG_EVERY_S`` seconds and one at the end. One switch turns bars off or on:
the config's ``progress`` (``auto`` | ``on`` | ``off``), also ``UNLEARN_EXP_PROGRESS``.
``LightningBar`` does the same for a Lightning fit or predict loop.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager

from tqdm.auto import tqdm

from unlearn_exp.errors import UserError

log = logging.getLogger("unlearn_exp")

LOG_EVERY_S = 30.0
MODES = ("auto", "on", "off")


def configure(mode: str | bool | None) -> None:
    """Set the switch for this process (``auto``: bars on a TTY, log lines elsewhere)."""
    if isinstance(mode, bool):
        mode = "on" if mode else "off"
    mode = str(mode or "auto")
    if mode not in MODES:
        raise UserError(f"progress must be one of {list(MODES)}, got '{mode}'")
    os.environ["UNLEARN_EXP_PROGRESS"] = mode


def bars_on() -> bool:
    mode = os.environ.get("UNLEARN_EXP_PROGRESS", "auto")
    if mode == "auto":
        return sys.stderr.isatty()
    return mode == "on"


class StageBar:
    """Progress of one stage; see the module docstring."""

    def __init__(self, label: str, total: int | None, unit: str = "it", smoothing: float = 0.05):
        self.label, self.total, self.unit = label, total, unit
        self.n, self.loss, self.smoothing = 0, None, smoothing
        self.start = self.last_log = time.time()
        self.bar = None
        if bars_on():
            self.bar = tqdm(total=total, desc=label, unit=unit, dynamic_ncols=True, leave=False)

    def update(self, n: int = 1, loss: float | None = None) -> None:
        self.n += n
        if loss is not None and loss == loss:  # an exponential moving average, as tqdm smooths rates
            self.loss = (
                loss if self.loss is None else (1 - self.smoothing) * self.loss + self.smoothing * loss
            )
        if self.bar is not None:
            if self.loss is not None:
                self.bar.set_postfix(loss=f"{self.loss:.4g}", refresh=False)
            self.bar.update(n)
        elif time.time() - self.last_log >= LOG_EVERY_S:
            self.last_log = time.time()
            log.info(self.line())

    def line(self, done: bool = False) -> str:
        elapsed = time.time() - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        out = f"{self.label}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"
        out += (" done" if done else "") + f" ({rate:.2f} {self.unit}/s"
        if done:
            out += f", {elapsed:.0f} s"
        elif self.total and rate > 0:
            out += f", ETA {max(self.total - self.n, 0) / rate:.0f} s"
        out += ")"
        if self.loss is not None:
            out += f", loss {self.loss:.4g}"
        return out

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        log.info(self.line(done=True) if self.n else f"{self.label}: nothing to do")


@contextmanager
def stage_bar(label: str, total: int | None, unit: str = "it"):
    bar = StageBar(label, total, unit)
    try:
        yield bar
    finally:
        bar.close()


def lightning_bar(label: str, total: int | None, unit: str = "step"):
    """A Lightning callback that reports a fit (steps, smoothed loss) or a predict loop (images)."""
    import lightning as L

    class LightningBar(L.Callback):
        def __init__(self):
            self.bar: StageBar | None = None

        def _open(self):
            if self.bar is None:
                self.bar = StageBar(label, total, unit)

        def on_train_start(self, trainer, module):
            self._open()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            self.bar.update(1, loss=float(loss.detach()) if hasattr(loss, "detach") else None)

        def on_train_end(self, trainer, module):
            self.bar.close()

        def on_predict_start(self, trainer, module):
            self._open()

        def on_predict_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
            self.bar.update(len(batch) if hasattr(batch, "__len__") else 1)

        def on_predict_end(self, trainer, module):
            self.bar.close()

    return LightningBar()
