"""Concept inversion (docs/methods.md 6): learn the token embedding ``v_*`` that draws a concept on a
given model.

``ConceptInversion`` is the LightningModule: only the K placeholder rows train; the UNet (with any
unlearning weights active), the VAE and the rest of the text encoder are frozen. The loss is the
latent-diffusion denoising loss of docs/methods.md 6.1:

    v_* = argmin_v E_{x, eps, t} || eps - eps_theta(sqrt(abar_t) z + sqrt(1 - abar_t) eps, t, E(y(<c*>))) ||^2

with ``z = VAE.enc(x).sample() * scale`` (the identity for a VAE-less model), ``t ~ U{0..T-1}`` and
``y`` a template holding the placeholder tokens (all K, or the first alone with
``inversion.prompt_tokens: first``, docs/methods.md 6.3). Every random draw of step ``s`` (image, flip,
timestep, noise, VAE sample, template) comes from a generator seeded by ``(seed, s)``, so a run resumed
from a checkpoint takes the same steps as an uninterrupted one. On a half-precision model the text
encoder runs in float32 for the stage, UNet and VAE in their dtype (docs/methods.md 13).

``invert`` runs it with ``lightning.Trainer`` and writes ``learned_embeds.safetensors`` (diffusers'
textual-inversion format) and ``metadata.json``.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from unlearn_exp.atomic import atomic_file, atomic_write_json
from unlearn_exp.errors import UserError
from unlearn_exp.hashing import config_hash
from unlearn_exp.identity import resolved_precision, without_neutral
from unlearn_exp.inversion.config import InversionConfig, PromptTokens
from unlearn_exp.inversion.image_sets import ImageSet, read_image_folder, tensor_image_set
from unlearn_exp.inversion.textual_inversion import (
    LearnedRowsEmbedding,
    add_placeholder_tokens,
    concept_prompt,
    install_learned_rows,
    merge_learned_rows,
    save_textual_inversion,
    split_rows,
    token_ids,
)
from unlearn_exp.models.components import Components
from unlearn_exp.progress import lightning_bar
from unlearn_exp.quiet import quiet_lightning
from unlearn_exp.runtime import keep_freed_memory
from unlearn_exp.training import StopOnSigterm, define_stage_axis, keeps_device

log = logging.getLogger(__name__)

EMBEDS_FILE = "learned_embeds.safetensors"
METADATA_FILE = "metadata.json"
LAST_CKPT = "last.ckpt"
LAST_GOOD_FILE = "last_good_embeds.safetensors"
_STEP_STRIDE = 1_000_003  # seed of step s: seed * stride + s


class InversionDiverged(UserError):
    """The loss became non-finite or exploded; ``step`` is the step that produced it."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(int(seed) * _STEP_STRIDE + int(step))


class ConceptInversion(L.LightningModule):
    """Learns the rows of ``tokens`` (already added with ``add_placeholder_tokens``) on ``images``."""

    def __init__(
        self, comps: Components, tokens: list[str], images: torch.Tensor, cfg: Any, run_key: str = ""
    ):
        super().__init__()
        self.settings = InversionConfig.from_cfg(cfg)
        self.comps = comps  # a dataclass, not a module: its modules are registered below
        self.tokens = list(tokens)
        token_ids(comps, self.tokens)
        comps.freeze()
        self.unet = comps.denoiser  # the UNet, or SD3's transformer
        self.text_encoder = comps.text_encoder
        self.vae = comps.vae
        others = [enc for _, _, enc in comps.text_encoder_slots()[1:]]
        if others:  # SD3's CLIP-G and T5: registered so Lightning moves them with the module
            self.other_text_encoders = torch.nn.ModuleList(others)
        current = comps.text_encoder.get_input_embeddings()
        self.embedding = (
            current
            if isinstance(current, LearnedRowsEmbedding)
            and current.ids.tolist() == token_ids(comps, self.tokens)
            else install_learned_rows(comps, self.tokens)
        )
        self.embedding.learned.requires_grad_(True)
        # the tokens a training prompt holds: all K, or only the first as CCE does (docs/methods.md 6.3)
        first_only = self.settings.prompt_tokens == PromptTokens.first
        self.prompt_tokens = self.tokens[:1] if first_only else list(self.tokens)
        self.register_buffer("images", tensor_image_set(images).images, persistent=False)
        self.run_key = run_key
        self.loss_history: list[float] = []
        self.last_good = self.embedding.learned.detach().float().cpu().clone()
        self.last_good_step = 0
        self.elapsed_before = 0.0  # training seconds of earlier (interrupted) runs
        self.resumed_from_step: int | None = None
        self._fit_start = None
        self._posterior: tuple[torch.Tensor, torch.Tensor] | None = None
        self.noise_scheduler = comps.training_scheduler()
        # Lightning checkpoints keep only the trainable rows (see ``state_dict``)
        self.strict_loading = False

    # ------------------------------------------------------------------ state
    def _trainable_names(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def state_dict(self, *args, **kwargs):
        """Only the trainable rows: the frozen model is never written into a checkpoint."""
        names = self._trainable_names()
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        return type(full)((k, v) for k, v in full.items() if k[len(prefix) :] in names)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        elapsed = self.elapsed_before + (time.time() - self._fit_start if self._fit_start else 0.0)
        checkpoint["concept_inversion"] = {
            "tokens": self.tokens,
            "run_key": self.run_key,
            "loss_history": list(self.loss_history),
            "elapsed_s": elapsed,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get("concept_inversion")
        names = self._trainable_names()
        if info is None or set(checkpoint.get("state_dict", {})) != names:
            raise UserError("the checkpoint is not a concept-inversion checkpoint of this run")
        if info["tokens"] != self.tokens or info["run_key"] != self.run_key:
            raise UserError(
                "the last checkpoint was written by a different inversion run (tokens, images, model or "
                "settings differ): delete it or use another checkpoint folder"
            )
        self.loss_history = list(info["loss_history"])
        self.elapsed_before = float(info["elapsed_s"])
        self.last_good = next(iter(checkpoint["state_dict"].values())).detach().float().cpu().clone()
        self.last_good_step = len(self.loss_history)
        self.resumed_from_step = int(checkpoint.get("global_step", len(self.loss_history)))

    # ------------------------------------------------------------------- loss
    @torch.no_grad()
    def _latent_posterior(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of ``VAE.enc(x)`` for each image and its mirror, ``(2, N, C, h, w)`` (scaled).

        The encoder is deterministic, so caching the posterior and sampling it each step is the same
        as encoding each step (docs/methods.md 6.2 augmentation: horizontal flip, then the VAE sample).
        """
        if self._posterior is None:
            views = torch.stack([self.images, self.images.flip(-1)])  # (2, N, 3, H, W)
            if self.vae is None:
                self._posterior = (
                    views.to(self.comps.dtype),
                    torch.zeros_like(views, dtype=self.comps.dtype),
                )
            else:
                means, stds = [], []
                # in the VAE's own dtype, outside any autocast: the same posterior whether the first
                # call is the evaluation before training or the first step (docs/methods.md 13)
                with torch.autocast(self.vae.device.type, enabled=False):
                    for chunk in views.flatten(0, 1).split(8):
                        dist = self.vae.encode(chunk.to(self.vae.device, self.vae.dtype)).latent_dist
                        means.append((dist.mean - self.comps.latent_shift) * self.comps.latent_scale)
                        stds.append(dist.std * self.comps.latent_scale)
                mean, std = torch.cat(means), torch.cat(stds)
                self._posterior = (mean.unflatten(0, (2, -1)), std.unflatten(0, (2, -1)))
        return self._posterior

    def draw(self, step: int, batch_size: int | None = None) -> dict[str, Any]:
        """All random choices of one step, from ``(seed, step)`` alone."""
        s = self.settings
        g = _step_generator(s.seed, step)
        mean, _ = self._latent_posterior()
        n, shape = mean.shape[1], mean.shape[2:]
        b = batch_size or s.batch_size
        return {
            "index": torch.randint(0, n, (b,), generator=g),
            "flip": (torch.rand(b, generator=g) < s.flip_p).long(),
            # every timestep of the schedule alike (SD v1: t ~ U{0..T-1}; SD3: its flow timesteps)
            "t": self.comps.training_timesteps(
                self.noise_scheduler, b, 1, int(self.noise_scheduler.config.num_train_timesteps), g
            ),
            "noise": torch.randn((b, *shape), generator=g),
            "vae_eps": torch.randn((b, *shape), generator=g),
            "template": torch.randint(0, len(s.templates), (b,), generator=g).tolist(),
        }

    def denoising_loss(self, prompts: list[str], draw: dict[str, Any]) -> torch.Tensor:
        """docs/methods.md 6.1 for one batch of draws, with the given prompts."""
        mean, std = self._latent_posterior()
        dev = mean.device
        i, f, t = draw["index"].to(dev), draw["flip"].to(dev), draw["t"].to(dev)
        z = mean[f, i] + std[f, i] * draw["vae_eps"].to(dev, mean.dtype)
        noise = draw["noise"].to(dev, mean.dtype)
        comps, sched = self.comps, self.noise_scheduler
        noisy = comps.training_input(sched, z, noise, t)
        cond = comps.condition(comps.tokenize(prompts))
        pred = comps.denoise(noisy, t, cond.to(self.unet.dtype))
        # the family's comparison: noise (or velocity) for SD v1, x0 estimates for SD3
        pred, target = comps.training_pair(sched, pred, noisy, z, noise, t)
        return F.mse_loss(pred.float(), target.float())

    def step_loss(self, step: int) -> torch.Tensor:
        draw = self.draw(step)
        prompts = [concept_prompt(self.prompt_tokens, self.settings.templates[k]) for k in draw["template"]]
        return self.denoising_loss(prompts, draw)

    # -------------------------------------------------------------- lightning
    def on_fit_start(self) -> None:
        self._fit_start = time.time()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        step = int(self.global_step)
        loss = self.step_loss(step)
        value = float(loss.detach())
        limit = self.settings.max_loss
        if not math.isfinite(value) or (limit is not None and value > limit):
            what = "non-finite" if not math.isfinite(value) else f"exploding (> max_loss {limit})"
            raise InversionDiverged(
                f"concept inversion stopped at step {step}: the loss is {what} ({value:.4g})", step
            )
        self.last_good = self.embedding.learned.detach().float().cpu().clone()
        self.last_good_step = step
        self.loss_history.append(value)
        self.log("inversion/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=1)
        self.log("inversion/step", float(step), on_step=True, on_epoch=False, batch_size=1)
        return loss

    def configure_optimizers(self):
        s = self.settings
        return torch.optim.AdamW(
            [self.embedding.learned],
            lr=s.lr,
            betas=tuple(s.betas),
            eps=s.adam_eps,
            weight_decay=s.weight_decay,
        )

    def train_dataloader(self):
        # the draws come from the step index; the loader only paces the steps
        return torch.utils.data.DataLoader(range(self.settings.steps), batch_size=None, shuffle=False)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluation_loss(
    module: ConceptInversion,
    prompt: str,
    draws: int,
    seed: int = 12345,
    t_range: tuple[int, int] | None = None,
) -> float:
    """Mean denoising loss of ``prompt`` over ``draws`` fixed draws (the same draws for any prompt).

    ``t_range = (lo, hi)`` restricts the timesteps to ``[lo, hi)`` (evenly spread), e.g. the high
    noise levels where the prompt, not the noisy image, decides the prediction.
    """
    losses = []
    for k in range(draws):
        d = module.draw(_STEP_STRIDE * 7919 + seed * draws + k, batch_size=1)
        if t_range is not None:
            lo, hi = t_range
            d["t"] = module.comps.timestep_near(module.noise_scheduler, lo + (k * (hi - lo)) // max(draws, 1))
        losses.append(float(module.denoising_loss([prompt], d)))
    return sum(losses) / max(len(losses), 1)


# ----------------------------------------------------------------------------- checkpoints
class RowsCheckpoint(L.Callback):
    """Every N steps (and at the end) write ``<dir>/last.ckpt`` atomically: trainable rows + optimiser."""

    def __init__(self, dirpath: str | Path, every_n_steps: int):
        self.dirpath = Path(dirpath)
        self.every = int(every_n_steps)

    def save(self, trainer: L.Trainer) -> Path:
        path = self.dirpath / LAST_CKPT
        with atomic_file(path) as tmp:  # the optimiser state too, on purpose: a resume continues Adam
            trainer.save_checkpoint(tmp, weights_only=False)
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step >= (trainer.max_steps or 0):
            self.save(trainer)


def _window_means(values: list[float], window: int) -> list[float]:
    if not values:
        return []
    w = max(1, min(window, len(values)))
    out, acc = [], sum(values[:w])
    out.append(acc / w)
    for i in range(w, len(values)):
        acc += values[i] - values[i - w]
        out.append(acc / w)
    return out


def _as_image_set(images_or_folder: Any, resolution: int) -> ImageSet:
    if isinstance(images_or_folder, ImageSet):
        return images_or_folder
    if isinstance(images_or_folder, str | Path):
        return read_image_folder(images_or_folder, resolution)
    if isinstance(images_or_folder, list):
        from unlearn_exp.sampling import from_pil

        return tensor_image_set(from_pil(images_or_folder, resolution), resolution)
    return tensor_image_set(images_or_folder, resolution)


def invert(
    comps: Components,
    images_or_folder: Any,
    inversion_cfg: Any,
    out_dir: str | Path,
    logger: Any = None,
    *,
    source: Any = None,
    ckpt_dir: str | Path | None = None,
    progress: bool = True,
    callbacks: list[L.Callback] | None = None,
) -> dict[str, Any]:
    """Learn ``C*`` on ``comps`` and write ``out_dir/learned_embeds.safetensors`` + ``metadata.json``.

    ``images_or_folder``: a folder path, an ``ImageSet``, a ``(N, 3, H, W)`` tensor in [-1, 1] or a
    list of PIL images. ``source`` identifies the checkpoint inverted on (recorded in the metadata).
    Checkpoints go to ``ckpt_dir`` (default ``out_dir/checkpoints``); a ``last.ckpt`` there from the
    same run is resumed. On success ``comps`` keep the tokens with their learned rows. If the loss
    diverges, the last good rows are written to ``ckpt_dir/last_good_embeds.safetensors``, put into
    ``comps``, and a ``UserError`` names the step; ``out_dir`` gets nothing.
    """
    wall_start = time.time()
    s = InversionConfig.from_cfg(inversion_cfg)
    image_set = _as_image_set(images_or_folder, comps.resolution)
    out_dir = Path(out_dir)
    ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else out_dir / "checkpoints"
    source, settings, run_key = _run_identity(comps, s, image_set, source)

    # CCE (diffusers' textual-inversion example) keeps the text encoder, its token table and so the
    # learned rows in float32, UNet and VAE in the half dtype: a half-precision text encoder is
    # float32 from the first placeholder row to the last evaluation (docs/methods.md 13)
    with comps.in_float32(*(n for n in comps.modules() if n.startswith("text_encoder"))):
        tokens = add_placeholder_tokens(comps, s.placeholder, s.num_vectors, s.init_word)
        module = ConceptInversion(comps, tokens, image_set.images, s, run_key=run_key)
        eval_prompt = concept_prompt(tokens, s.templates[0])
        eval_init = evaluation_loss(module, eval_prompt, s.eval_draws) if s.eval_draws else None
        trainer = _inversion_trainer(s, ckpt_dir, logger, progress, callbacks)
        _fit_rows(trainer, module, comps, tokens, ckpt_dir)
        rows = merge_learned_rows(comps)
        eval_final = evaluation_loss(module, eval_prompt, s.eval_draws) if s.eval_draws else None

    window = _window_means(module.loss_history, s.loss_window)
    metadata = _metadata(
        comps,
        s,
        tokens=tokens,
        source=source,
        image_set=image_set,
        trainer=trainer,
        module=module,
        window=window,
        wall_start=wall_start,
        settings=settings,
        run_key=run_key,
        eval_init=eval_init,
        eval_final=eval_final,
    )
    _write_outputs(out_dir, tokens, file_rows(comps, rows), run_key, metadata, window)
    return {
        **metadata,
        "embeds_path": str(out_dir / EMBEDS_FILE),
        "metadata_path": str(out_dir / METADATA_FILE),
    }


def _run_identity(
    comps: Components, s: InversionConfig, image_set: ImageSet, source: Any
) -> tuple[Any, dict[str, Any], str]:
    """The recorded source, the settings and the run key a resumed run must match (docs/methods.md 6)."""
    source = source if source is not None else {"name": comps.name, "source": comps.source}
    settings = without_neutral("inversion", s.as_dict())  # prompt_tokens: all leaves the key as it was
    run_key = config_hash({"settings": settings, "images": image_set.identity, "source": source})
    return source, settings, run_key


def _inversion_trainer(
    s: InversionConfig,
    ckpt_dir: Path,
    logger: Any,
    progress: bool,
    callbacks: list[L.Callback] | None,
) -> L.Trainer:
    """The Lightning trainer of docs/methods.md 6.2, checkpointing the rows into ``ckpt_dir``."""
    last = ckpt_dir / LAST_CKPT
    if last.is_file():
        log.info("concept inversion: resuming from %s", last)
    if logger is not None:
        define_stage_axis(logger, "inversion")
    keep_freed_memory()

    quiet_lightning()  # Lightning's info lines and tips stay out of the run's output
    return L.Trainer(
        max_steps=s.steps,
        accelerator="auto",
        devices=1,
        precision=resolved_precision(s.precision),
        logger=logger if logger is not None else False,
        callbacks=[
            StopOnSigterm(),
            RowsCheckpoint(ckpt_dir, s.checkpoint_every),
            *(callbacks or []),
            *([lightning_bar("concept inversion (C*)", s.steps, "step")] if progress else []),
        ],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=s.log_every_n_steps,
        num_sanity_val_steps=0,
        default_root_dir=str(ckpt_dir),
    )


def _fit_rows(
    trainer: L.Trainer, module: ConceptInversion, comps: Components, tokens: list[str], ckpt_dir: Path
) -> None:
    """Train the rows (docs/methods.md 6.2), resuming ``last.ckpt``; on divergence keep the last good rows."""
    last = ckpt_dir / LAST_CKPT
    try:
        with keeps_device(comps):  # Lightning leaves its module (and the model) on the CPU
            # our own checkpoint (tensors and plain values): read with weights_only=True
            ckpt = str(last) if last.is_file() else None
            trainer.fit(module, ckpt_path=ckpt, weights_only=True)
    except InversionDiverged as exc:
        rows = merge_learned_rows(comps, module.last_good)
        path = save_textual_inversion(
            ckpt_dir / LAST_GOOD_FILE,
            tokens,
            file_rows(comps, rows),
            {"step": module.last_good_step, "diverged_at": exc.step},
        )
        raise InversionDiverged(
            f"{exc}; the last good embedding (step {module.last_good_step}) is in {path}", exc.step
        ) from None
    except BaseException:
        merge_learned_rows(comps, module.last_good)
        raise


def _metadata(
    comps: Components,
    s: InversionConfig,
    *,
    tokens: list[str],
    source: Any,
    image_set: ImageSet,
    trainer: L.Trainer,
    module: ConceptInversion,
    window: list[float],
    wall_start: float,
    settings: dict[str, Any],
    run_key: str,
    eval_init: float | None,
    eval_final: float | None,
) -> dict[str, Any]:
    """``metadata.json`` of one run: tokens, source, image set, losses and timings (docs/methods.md 6)."""
    fit_s = time.time() - (module._fit_start or wall_start)
    return {
        "tokens": tokens,
        "prompt": concept_prompt(tokens),
        "placeholder": s.placeholder,
        "num_vectors": s.num_vectors,
        "init_word": s.init_word,
        "source": source,
        "model": {"name": comps.name, "source": comps.source, "text_dim": comps.text_dim},
        "image_set": image_set.describe(),
        "steps": int(trainer.global_step),
        "resumed_from_step": module.resumed_from_step,
        "initial_loss": window[0] if window else None,
        "final_loss": window[-1] if window else None,
        "best_loss": min(window) if window else None,
        "loss_window": s.loss_window,
        "eval_loss_init": eval_init,
        "eval_loss_final": eval_final,
        "wall_s": round(time.time() - wall_start, 3),
        "train_s_total": round(module.elapsed_before + fit_s, 3),
        "settings": settings,
        "run_key": run_key,
        "format": (
            "diffusers textual inversion (safetensors, one tensor (K, D) named after the first token)"
            if len(comps.text_encoder_slots()) == 1
            else "diffusers textual inversion, SDXL convention (safetensors, one (K, D) tensor per text "
            "encoder: clip_l, clip_g, t5; tokens in the header)"
        ),
    }


def file_rows(comps: Components, rows: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
    """The learned rows as the file holds them: ``(K, D)`` for one text encoder, by encoder for several."""
    return rows if len(comps.text_encoder_slots()) == 1 else split_rows(comps, rows)


def _write_outputs(
    out_dir: Path,
    tokens: list[str],
    rows: torch.Tensor | dict[str, torch.Tensor],
    run_key: str,
    metadata: dict[str, Any],
    window: list[float],
) -> None:
    """Write the embedding (diffusers' format, docs/methods.md 6.1), then ``metadata.json``, atomically."""
    save_textual_inversion(
        out_dir / EMBEDS_FILE, tokens, rows, {"run_key": run_key, "steps": metadata["steps"]}
    )
    atomic_write_json(out_dir / METADATA_FILE, metadata)
    log.info(
        "concept inversion: %d steps, final loss %.4f, wrote %s",
        metadata["steps"],
        window[-1] if window else float("nan"),
        out_dir,
    )
