"""Launching parallel local jobs: one GPU per joblib worker (the ``hydra/launcher=joblib`` preset).

``pin_gpu_worker`` gives a worker process a GPU of its own before CUDA starts; ``GpuPinning`` is the
Hydra callback that calls it at each job start (``conf/hydra/launcher/gpu_pinning/per_worker.yaml``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from pathlib import Path

from filelock import FileLock, Timeout
from hydra.experimental.callback import Callback

log = logging.getLogger("unlearn_exp.launch")

_HELD_LOCK = None


def visible_gpus() -> list[str]:
    """GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else ``nvidia-smi -L``.

    Does not initialise CUDA (so ``CUDA_VISIBLE_DEVICES`` can still be set afterwards).
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


def pin_gpu_worker(lock_dir: str | None = None) -> str | None:
    """Give this worker process a GPU of its own and restrict CUDA to it (before CUDA starts).

    Runs as the joblib workers' initializer (``conf/hydra/launcher/joblib.yaml``): each worker
    takes the first GPU whose lock file no other live process holds, keeps the lock for its
    lifetime (the OS releases it when the process ends) and sets ``CUDA_VISIBLE_DEVICES``; jobs
    then see that GPU as ``cuda:0``. Locks are per machine, so two sweeps also avoid each other.
    More workers than GPUs: the extra ones share, round-robin by pid. No GPU: nothing changes.
    """
    global _HELD_LOCK

    gpus = visible_gpus()
    if not gpus:
        return None
    root = Path(
        lock_dir
        or os.environ.get("UNLEARN_EXP_GPU_LOCKS")
        or Path(tempfile.gettempdir()) / "unlearn_exp_gpus"
    )
    root.mkdir(parents=True, exist_ok=True)
    chosen = None
    for g in gpus:
        lock = FileLock(str(root / f"gpu{g}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue
        _HELD_LOCK, chosen = lock, g
        break
    if chosen is None:
        chosen = gpus[os.getpid() % len(gpus)]
        log.warning("more workers than GPUs: worker %d shares GPU %s", os.getpid(), chosen)
    os.environ["CUDA_VISIBLE_DEVICES"] = chosen
    return chosen


class GpuPinning(Callback):
    """Hydra callback of the ``hydra/launcher=joblib`` preset: ``pin_gpu_worker`` at each job start.

    Runs inside the worker process before the job's code, so the GPU is set before CUDA starts;
    later jobs of the same worker keep the GPU it already holds.
    """

    def __init__(self, lock_dir: str | None = None):
        self.lock_dir = lock_dir

    def on_job_start(self, config, **kwargs) -> None:
        if _HELD_LOCK is not None:
            return
        try:
            gpu = pin_gpu_worker(self.lock_dir)
        except Exception as e:  # placement is an optimisation: never fail a job over it
            log.warning("GPU pinning skipped (%s: %s)", type(e).__name__, e)
            return
        if gpu is not None:
            log.info("worker %d pinned to GPU %s", os.getpid(), gpu)
