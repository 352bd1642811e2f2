"""A run prints its results, its progress and real warnings; Lightning's chatter is kept out.

``quiet_lightning()`` is called once Hydra (or the demo) has set up logging, and again by every
Trainer we build (idempotent, cheap). What it does, and why each part is safe:

* Lightning lines printed twice: the top-level ``lightning`` package always adds its own console
  handler (``INFO: ...``) at import, while ``lightning.pytorch`` propagates to the root logger when
  the root already had a handler at import time (Hydra's job logging does). Each record then went
  out through both. Where the root logger has a handler, the Lightning loggers' own console
  handlers are removed and their records propagate: one line, in the run's format, also in the
  job's log file.
* ``GPU available: ... / TPU available / HPU available``, the precision and Tensor Core notices,
  ``Trainer.fit stopped: max_steps reached``, "Restoring states from the checkpoint" and the
  "💡 Tip: ... litlogger / litmodels" lines are ``rank_zero_info`` records, and on a GPU
  ``LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES`` an INFO record of Lightning's CUDA accelerator: those
  loggers (``INFO_LOGGERS``) are set to WARNING, so Lightning's warnings still show. A resumed
  training says so in our own line instead (``training.fit``).
* "`weights_only` was not set, defaulting to `False`" is an INFO note of Lightning's checkpoint
  connector when a checkpoint is *saved* without saying whether it holds the optimiser state; our
  checkpoints hold it on purpose (a resumed run continues the same optimiser). That one message is
  filtered out.
* Three Lightning warnings that do not apply to our trainers are ignored by their text, from
  Lightning's modules only (``NOISE_WARNINGS``): the frozen models (UNet, VAE, text encoder, the
  reference copies) are in eval mode on purpose; the data loaders index steps (every draw is made
  inside the step from (seed, global step)), so worker processes would add nothing; and for the
  same reason a run resumed mid-epoch follows the same path as an uninterrupted one (tested).
  Every other warning, Lightning's included, is shown.
"""

from __future__ import annotations

import logging
import sys
import warnings

# loggers whose INFO records are never a result: Lightning's rank-zero notes, and the device line
INFO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.pytorch.accelerators.cuda",  # "LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: [0]"
)
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
CHECKPOINT_CONNECTOR = "lightning.pytorch.trainer.connectors.checkpoint_connector"
LIGHTNING_MODULES = r"lightning\."  # the warnings below are ignored only when Lightning's code issues them

# (message regex, why it does not apply); matched against Lightning's own modules only
NOISE_WARNINGS = (
    (r"Found \d+ module\(s\) in eval mode at the start of training", "frozen models are eval on purpose"),
    (r"The '\w+' does not have many workers", "the loaders index steps; the data are drawn in the step"),
    (
        r"You're resuming from a checkpoint that ended before the epoch ended",
        "every draw comes from (seed, global step): a resumed run takes the same steps",
    ),
)


class _WeightsOnlyNote(logging.Filter):
    """Drops Lightning's note that a checkpoint was saved with its optimiser state by default."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("`weights_only` was not set")


_WEIGHTS_ONLY_NOTE = _WeightsOnlyNote()


def quiet_lightning() -> None:
    """Keep Lightning's info lines, tips and three inapplicable warnings out of the output (see the
    module docstring); Lightning's other warnings and errors still show."""
    # Lightning's import adds the console handlers removed here: where it is not imported yet (a run
    # that reuses its results never imports it, and should not pay for it), the sites that build a
    # Trainer call this again after importing it
    if logging.getLogger().hasHandlers() and any(m in sys.modules for m in LIGHTNING_LOGGERS):
        for name in LIGHTNING_LOGGERS:
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                if type(handler) is logging.StreamHandler:  # Lightning's own console handlers
                    logger.removeHandler(handler)
            logger.propagate = True
    for name in INFO_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    connector = logging.getLogger(CHECKPOINT_CONNECTOR)
    if _WEIGHTS_ONLY_NOTE not in connector.filters:
        connector.addFilter(_WEIGHTS_ONLY_NOTE)
    have = {(f[1].pattern, f[3].pattern) for f in warnings.filters if f[0] == "ignore" and f[1] and f[3]}
    for pattern, _why in NOISE_WARNINGS:
        # added once: every change to the filters resets the record of warnings already shown, so a
        # real warning shown once would show again after each Trainer
        if (pattern, LIGHTNING_MODULES) not in have:
            warnings.filterwarnings("ignore", message=pattern, module=LIGHTNING_MODULES)
