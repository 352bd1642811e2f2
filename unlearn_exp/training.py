"""Generic Lightning training plumbing (DUO, ESD, the toy judge): resumable, atomic, logged.

A run writes Lightning checkpoints into a work folder outside the artifact's temporary build folder,
so a killed job resumes from ``last.ckpt`` when it is started again with the same config. The
checkpoints hold only the trained parameters and the optimiser state, never the frozen model, and
are read back with ``torch.load(weights_only=True)`` (tensors and plain values, no pickled code).
Randomness is drawn from generators keyed by (seed, global step), so a resumed run follows the
same path as an uninterrupted one.
"""

from __future__ import annotations

import logging
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO

from unlearn_exp.atomic import atomic_file
from unlearn_exp.identity import resolved_precision
from unlearn_exp.progress import lightning_bar
from unlearn_exp.quiet import quiet_lightning
from unlearn_exp.runtime import keep_freed_memory

LAST = "last.ckpt"
log = logging.getLogger("unlearn_exp")


class StopOnSigterm(L.Callback):
    """Stop at the next batch after SIGTERM (``kill``, a scheduler's cancel) with exit status 143, as
    a process ended by SIGTERM. Lightning's own handler only notes the signal: its predict loop never
    looks (a sampling job went on to its end) and its fit loop exits with status 0. The artifact
    being built is left unwritten; a rerun resumes from the last whole chunk or checkpoint."""

    def _check(self, trainer, what: str) -> None:
        if trainer.received_sigterm:
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            log.warning("SIGTERM: %s stops here; a rerun resumes from what is saved", what)
            raise SIGTERMException(143)

    def on_predict_batch_end(self, trainer, *args, **kwargs) -> None:
        self._check(trainer, "sampling")

    def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
        self._check(trainer, "training")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary file and renamed, so a kill never truncates one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        with atomic_file(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


class StepIndex(torch.utils.data.Dataset):
    """One item per optimisation step; the trainers draw their own data from (seed, global step)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class TrainedOnly:
    """LightningModule mixin: checkpoints hold only parameters with ``requires_grad``."""

    strict_loading = False
    start_step = 0

    def on_train_start(self) -> None:
        self.start_step = int(self.global_step)  # > 0 when resumed from a checkpoint

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(
        (int(seed) * 1_000_003 + int(step) * 7_919 + salt) % (2**63 - 1)
    )


def define_stage_axis(logger, prefix: str | None) -> None:
    """On a W&B logger, plot ``<prefix>/*`` against the stage's own step ``<prefix>/step`` (which the
    module logs), so the stages of one run (DUO, then inversion) each start at step 0."""
    experiment = getattr(logger, "experiment", None) if prefix else None
    define = getattr(experiment, "define_metric", None)
    if define is None or type(logger).__name__ != "WandbLogger":
        return
    try:
        define(f"{prefix}/step")
        define(f"{prefix}/*", step_metric=f"{prefix}/step")
    except Exception as e:  # a tracking problem never stops training
        logging.getLogger("unlearn_exp").warning("W&B step axis for %s/* not set (%s)", prefix, e)


@contextmanager
def keeps_device(*modules):
    """Put ``modules`` (``Components`` or ``nn.Module``) back on the device they are on now when the
    block ends: Lightning moves the module it ran, and so the shared model it holds, to the CPU at
    the end of ``fit`` and ``predict``, and the next stage then ran on the CPU of a GPU machine."""
    devices = []
    for m in modules:
        if m is not None:
            devices.append((m, next(m.parameters()).device if isinstance(m, torch.nn.Module) else m.device))
    try:
        yield
    finally:
        for m, device in devices:
            m.to(device)


def fit(
    module: L.LightningModule,
    *,
    steps: int,
    work_dir: Path,
    checkpoint_every: int,
    grad_clip: float | None,
    precision: str = "auto",
    logger=None,
    callbacks: list | None = None,
    progress: bool = True,
    label: str = "training",
) -> dict[str, Any]:
    """Train ``module`` for ``steps`` optimiser steps, resuming from ``work_dir/checkpoints/last.ckpt``;
    a labelled bar (or log lines) shows the steps and the smoothed loss."""
    keep_freed_memory()
    quiet_lightning()
    work_dir = Path(work_dir)
    ckpt_dir = work_dir / "checkpoints"
    resume = ckpt_dir / LAST
    loggers: list = [CSVLogger(str(work_dir), name="logs", version=0)]
    if logger is not None:
        loggers.append(logger)
        define_stage_axis(logger, getattr(module, "metric_prefix", None))
    ckpt = ModelCheckpoint(
        dirpath=str(ckpt_dir),
        every_n_train_steps=max(1, int(checkpoint_every)),
        save_top_k=0,
        save_last=True,
        enable_version_counter=False,
    )
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=int(steps),
        precision=resolved_precision(precision),
        gradient_clip_val=grad_clip,
        logger=loggers,
        callbacks=[
            StopOnSigterm(),
            *(callbacks or []),
            ckpt,
            *([lightning_bar(label, int(steps), "step")] if progress else []),
        ],
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(work_dir),
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
    )
    loader = torch.utils.data.DataLoader(StepIndex(int(steps)), batch_size=1, shuffle=False)
    if resume.is_file():
        log.info("%s: resuming from %s", label, resume)
    with keeps_device(module, getattr(module, "comps", None)):
        # weights_only=True (Trainer.fit passes it on to torch.load, Lightning 2.6): last.ckpt is our own
        # file and holds only tensors and plain values (the trained parameters, the optimiser state,
        # loop counters), so it loads without unpickling code and without torch's weights_only notice
        trainer.fit(module, loader, ckpt_path=str(resume) if resume.is_file() else None, weights_only=True)
    return {"resumed_from_step": int(getattr(module, "start_step", 0)), "steps": int(trainer.global_step)}


def fit_recipe(
    module: L.LightningModule, hp: dict[str, Any], work_dir: Path, *, label: str, logger=None, callbacks=None
) -> dict[str, Any]:
    """``fit`` with the training keys every trainer's recipe holds: ``steps``, ``checkpoint_every``,
    ``grad_clip`` and ``precision`` (DUO, ESD, SPM)."""
    return fit(
        module,
        steps=int(hp["steps"]),
        work_dir=Path(work_dir),
        checkpoint_every=int(hp["checkpoint_every"]),
        grad_clip=hp["grad_clip"],
        precision=str(hp["precision"]),
        logger=logger,
        callbacks=callbacks,
        label=label,
    )


def copy_metrics(work_dir: Path, out_dir: Path) -> None:
    """Keep the loss curves (Lightning's CSV log) with the artifact."""
    src = Path(work_dir) / "logs" / "version_0" / "metrics.csv"
    if src.is_file():
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, Path(out_dir) / "metrics.csv")
