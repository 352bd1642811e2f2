"""DUO: Direct Unlearning Optimization (docs/methods.md 5).

A LoRA on the UNet's self-attention (5.2) is trained by a Diffusion-DPO style preference loss on
(unsafe ``x^l``, safe ``x^w``) pairs under the null prompt, plus an output-preservation term at
``t = T`` on pure noise (5.3). The reference model is the same UNet with its adapters disabled.
The learning rate and lambda follow the scripts' scaling with beta (5.4); both can be set
explicitly (``lr_override``, ``lambda_override``) for models where that scaling does not fit.
The output is one ``pytorch_lora_weights.safetensors`` per adapter, which diffusers'
``load_lora_weights`` reads; several adapters (violence: Blood, Gun, Horror, Suffer) are combined
with ``set_adapters`` and per-adapter weights (5.5).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from unlearn_exp.atomic import atomic_write_json
from unlearn_exp.checks import Checks
from unlearn_exp.errors import UserError
from unlearn_exp.hashing import config_hash, file_sha256
from unlearn_exp.hashing import to_plain as _plain
from unlearn_exp.identity import without_neutral
from unlearn_exp.models.components import Components, Conditioning
from unlearn_exp.registry import UNLEARNING
from unlearn_exp.training import TrainedOnly, copy_metrics, fit_recipe, step_generator
from unlearn_exp.unlearning.config import DUOCheckpointConfig
from unlearn_exp.unlearning.config import beta_map as check_beta_map
from unlearn_exp.unlearning.pairs import PairSet

SELF_ATTENTION = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"]
LORA_FILE = "pytorch_lora_weights.safetensors"


# ----------------------------------------------------------------------------- the objective (5.3)
def per_image_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean((pred - target)^2)`` over C, H, W: one value per image."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def preference_loss(
    model_w: torch.Tensor,
    ref_w: torch.Tensor,
    model_l: torch.Tensor,
    ref_l: torch.Tensor,
    target: torch.Tensor,
    beta: float,
    target_l: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``L_dpo = -log sigmoid(-beta * diff)``, batch mean, with
    ``diff = [L_m(x^w) - L_r(x^w)] - [L_m(x^l) - L_r(x^l)]`` (docs/methods.md 5.3). ``target``: the
    noise both images share (SD v1), or ``x^w``'s own target with ``target_l`` ``x^l``'s (SD3's x0
    targets, 5.8). Returns (loss, diff)."""
    target_l = target if target_l is None else target_l
    diff = (per_image_error(model_w, target) - per_image_error(ref_w, target)) - (
        per_image_error(model_l, target_l) - per_image_error(ref_l, target_l)
    )
    return -F.logsigmoid(-beta * diff).mean(), diff


def output_preservation_loss(model_T: torch.Tensor, ref_T: torch.Tensor) -> torch.Tensor:
    """``L_pp = mean((eps_theta(x_T, T, c_0) - eps_ref(x_T, T, c_0))^2)`` (docs/methods.md 5.3)."""
    return (model_T.float() - ref_T.float()).pow(2).mean()


def effective_beta(cfg: dict[str, Any], beta: float) -> float:
    """The beta the loss and the lr/lambda scaling see: ``beta / beta_scale``, or ``beta_map``'s value.

    ``beta_scale`` (1.0 in conf/checkpoint/duo.yaml = the paper) maps the paper's beta values onto a
    model whose error gaps live on another scale (the toy, docs/design.md 2); it is a departure from
    docs/methods.md 5.4 only when set to another value. ``beta_map`` (null = none; the toy's departure,
    docs/toy.md) names the beta
    for each paper beta as ``[[250, 20], [500, 24], ...]`` pairs (a list, not a mapping: the composed
    config goes through JSON, which would turn numeric keys into strings), linear in log(beta) between
    them; a beta outside its range is refused.
    """
    if beta <= 0:
        raise UserError(f"DUO beta must be > 0, got {beta}")
    scale = float(cfg["beta_scale"])
    if scale <= 0:
        raise UserError(f"checkpoint.beta_scale must be > 0, got {scale}")
    table = cfg.get("beta_map")
    if not table:
        return float(beta) / scale
    if scale != 1.0:
        raise UserError(f"set checkpoint.beta_map or checkpoint.beta_scale, not both (beta_scale={scale})")
    c = Checks()
    check_beta_map(c, table, float(beta))  # the same rules composition-time validation applies
    if c.problems:
        raise UserError("; ".join(c.problems))
    points = sorted((float(k), float(v)) for k, v in table)
    x = math.log(float(beta))
    for (k0, v0), (k1, v1) in zip(points, points[1:]):
        if x <= math.log(k1):
            w = (x - math.log(k0)) / (math.log(k1) - math.log(k0))
            return v0 + w * (v1 - v0)
    return points[-1][1]  # a one-entry map


def scaled_hyperparameters(cfg: dict[str, Any], beta: float) -> tuple[float, float]:
    """``lr = lr_base * 100 / beta``, ``lambda = lambda_base * beta / 100`` (docs/methods.md 5.4), with
    ``beta`` already divided by ``beta_scale`` (see ``effective_beta``)."""
    if beta <= 0:
        raise UserError(f"DUO beta must be > 0, got {beta}")
    lr, lam = cfg["lr_override"], cfg["lambda_override"]
    lr = float(lr) if lr is not None else float(cfg["lr_base"]) * 100.0 / beta
    lam = float(lam) if lam is not None else float(cfg["lambda_base"]) * beta / 100.0
    return lr, lam


# ----------------------------------------------------------------------------- LoRA (5.2)
def add_lora(
    unet, adapter_name: str, *, rank: int, alpha: float, init: str | bool, targets, seed: int
) -> list:
    """Add a peft LoRA adapter to ``unet`` (trainable, fp32) and return its parameters."""
    from peft import LoraConfig

    if rank < 1:
        raise UserError(f"LoRA rank must be >= 1, got {rank}")
    config = LoraConfig(
        r=int(rank), lora_alpha=float(alpha), init_lora_weights=init, target_modules=list(targets)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        try:
            unet.add_adapter(config, adapter_name=adapter_name)
        except ValueError as e:
            raise UserError(f"cannot add LoRA to the UNet: {str(e).splitlines()[0]}") from e
    unet.set_adapter(adapter_name)
    params = []
    for n, p in unet.named_parameters():
        mine = f".{adapter_name}." in n and "lora_" in n
        p.requires_grad_(mine)
        if mine:
            p.data = p.data.float()  # LoRA parameters in fp32 (docs/methods.md 5.2)
            params.append(p)
    if not params:
        raise UserError(f"LoRA target modules {list(targets)} match no layer of this UNet")
    return params


@contextmanager
def adapters_disabled(unet) -> Iterator[None]:
    """The reference model: the same UNet with every LoRA adapter switched off."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layer = next((m for m in unet.modules() if isinstance(m, BaseTunerLayer)), None)
    was_disabled = layer is None or bool(layer.disable_adapters)
    unet.disable_adapters()
    try:
        yield
    finally:
        if not was_disabled:  # nested use keeps the outer state
            unet.enable_adapters()


def save_lora(unet, adapter_name: str, folder: Path, family: str = "sd1") -> Path:
    """Write the adapter as diffusers' ``pytorch_lora_weights.safetensors`` (with its LoRA config), in
    the family's format: ``unet.*`` keys that ``StableDiffusionPipeline.load_lora_weights`` reads, or
    ``transformer.*`` keys for ``StableDiffusion3Pipeline`` (as DUO's SD3 script writes them)."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline
    from peft import get_peft_model_state_dict

    state = {
        k: v.detach().cpu().contiguous()
        for k, v in get_peft_model_state_dict(unet, adapter_name=adapter_name).items()
    }
    folder.mkdir(parents=True, exist_ok=True)
    meta = _ordered(unet.peft_config[adapter_name].to_dict())
    if family == "sd3":
        StableDiffusion3Pipeline.save_lora_weights(
            str(folder), transformer_lora_layers=state, transformer_lora_adapter_metadata=meta
        )
    else:
        StableDiffusionPipeline.save_lora_weights(
            str(folder), unet_lora_layers=state, unet_lora_adapter_metadata=meta
        )
    return _one_metadata_key(folder / LORA_FILE)


def _one_metadata_key(path: Path) -> Path:
    """Rewrite a LoRA file with only its ``lora_adapter_metadata`` entry: safetensors writes the
    header's metadata from a hash map, so two entries came out in either order from one process to
    the next, and the same weights were different bytes. (``format: pt`` is not needed to load it.)"""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    keep = {k: v for k, v in meta.items() if k == "lora_adapter_metadata"}
    save_file(load_file(str(path)), str(path), metadata=keep or None)
    return path


def _ordered(meta: dict) -> dict:
    """The LoRA config with its sets (``target_modules``) sorted: peft keeps them as sets, whose order
    follows the process's string-hash seed, so the same weights were written as different bytes (and
    named by another sha256) from one run to the next."""
    out = {}
    for k, v in meta.items():
        if isinstance(v, set | frozenset) or (k == "target_modules" and isinstance(v, list)):
            v = sorted(v)
        out[k] = v
    return out


# ----------------------------------------------------------------------------- the LightningModule
class DUO(TrainedOnly, L.LightningModule):
    """DUO training on one pair set (docs/methods.md 5.3); the UNet must already carry the LoRA adapter."""

    metric_prefix = "duo"

    def __init__(
        self,
        comps: Components,
        unsafe: torch.Tensor,
        safe: torch.Tensor,
        *,
        beta: float,
        lr: float,
        lambda_: float,
        batch: int = 4,
        t_min: int = 1,
        t_max: int = 750,
        weight_decay: float = 1e-2,
        seed: int = 42,
        prompts: list[str] | None = None,
        text_length: int | None = None,
    ):
        super().__init__()
        if beta <= 0:
            raise UserError(f"DUO beta must be > 0, got {beta}")
        if unsafe.shape != safe.shape or len(unsafe) == 0:
            raise UserError(
                "DUO needs equal, non-empty unsafe/safe image sets, "
                f"got {tuple(unsafe.shape)} and {tuple(safe.shape)}"
            )
        n_train = int(comps.scheduler_config.get("num_train_timesteps", 1000))
        if not 1 <= t_min < t_max <= n_train:
            raise UserError(f"DUO needs 1 <= t_min < t_max <= {n_train}, got t_min={t_min}, t_max={t_max}")
        self.comps = comps
        self.unet = comps.denoiser  # the UNet, or SD3's transformer
        self.vae = comps.vae
        self.noise_scheduler = comps.training_scheduler()
        self.beta, self.lr, self.lambda_ = float(beta), float(lr), float(lambda_)
        self.batch = int(min(batch, len(unsafe)))
        self.t_min, self.t_max = int(t_min), int(t_max)
        self.T = comps.final_timestep(self.noise_scheduler)
        self.weight_decay, self.seed = float(weight_decay), int(seed)
        # images kept as uint8 on the module (moved to the device with it)
        self.register_buffer("unsafe_u8", _to_u8(unsafe), persistent=False)
        self.register_buffer("safe_u8", _to_u8(safe), persistent=False)
        with torch.no_grad():
            # training prompts are empty: the null text c_0 (SD3: T5 at DUO's text_length)
            c0 = comps.condition_prompts([""], text_length=text_length)
            # condition=unsafe (a departure, see checkpoint/duo.yaml): pair i's preference term is
            # conditioned on its unsafe prompt instead of c_0; the preservation term keeps c_0
            if prompts is not None and len(prompts) != len(unsafe):
                raise UserError(f"DUO got {len(prompts)} pair prompts for {len(unsafe)} pairs")
            cond = (
                comps.condition_prompts(list(prompts), text_length=text_length)
                if prompts is not None
                else None
            )
        # buffers, so Lightning moves them with the module (a Conditioning is two tensors)
        self.register_buffer("c0", c0.sequence.detach(), persistent=False)
        self.register_buffer("c0_pooled", _detached(c0.pooled), persistent=False)
        self.register_buffer("c_pairs", None if cond is None else cond.sequence.detach(), persistent=False)
        self.register_buffer(
            "c_pairs_pooled", None if cond is None else _detached(cond.pooled), persistent=False
        )

    # -- data drawn from (seed, step): shuffled epochs over the pairs, as a DataLoader would
    def pair_indices(self, step: int) -> torch.Tensor:
        n, b = len(self.unsafe_u8), self.batch
        rank, world = self.global_rank, max(1, self.trainer.world_size if self._trainer else 1)
        out, perms = [], {}
        for j in range(b):
            k = (step * world + rank) * b + j
            epoch = k // n
            if epoch not in perms:
                perms[epoch] = torch.randperm(n, generator=step_generator(self.seed, epoch, salt=17))
            out.append(int(perms[epoch][k % n]))
        return torch.tensor(out)

    def _condition(self, idx: torch.Tensor, b: int, dtype: torch.dtype) -> Conditioning:
        """The preference rows' condition (c_0, or each pair's unsafe prompt) and c_0 for the rest."""
        pooled = self.c0_pooled
        cond = Conditioning(self.c0, pooled).expand(3 * b).to(dtype)
        if self.c_pairs is not None:
            i = idx.to(self.c0.device)
            pair = Conditioning(self.c_pairs[i], None if pooled is None else self.c_pairs_pooled[i]).to(dtype)
            rest = Conditioning(cond.sequence[2 * b :], None if pooled is None else cond.pooled[2 * b :])
            cond = Conditioning.cat([pair, pair, rest])
        return cond

    def losses(self, idx: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
        dev = self.c0.device
        b = len(idx)
        with torch.no_grad(), torch.autocast(dev.type, enabled=False):
            # the VAE outside mixed precision, in its own dtype: float32 while training (train_adapter),
            # as DUO's script encodes (docs/methods.md 13); the latents then take the denoiser's dtype
            x_l = self.unsafe_u8[idx.to(dev)].float() / 127.5 - 1
            x_w = self.safe_u8[idx.to(dev)].float() / 127.5 - 1
            z = self.comps.encode_images(torch.cat([x_w, x_l]), generator=g)
        noise = torch.randn(z[:b].shape, generator=g).to(dev, z.dtype)  # shared by the pair
        t = self.comps.training_timesteps(self.noise_scheduler, 2 * b, self.t_min, self.t_max, g).to(dev)
        return self.objective(z, noise, t, self._condition(idx, b, z.dtype))

    def objective(
        self, z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond: Conditioning
    ) -> dict[str, torch.Tensor]:
        """DUO's loss (5.3) for the pair latents ``z = [x^w; x^l]``, their shared ``noise``, their
        timesteps ``t`` and the condition of the ``3B`` rows, in the model family's terms: its noisy
        input, its timestep of the preservation term and what its loss compares (docs/methods.md 5.8)."""
        comps, sched, b = self.comps, self.noise_scheduler, len(noise)
        x_t = comps.training_input(sched, z, torch.cat([noise, noise]), t)
        t_T = torch.full((b,), _scalar(self.T), device=t.device, dtype=t.dtype)
        x_T = comps.training_input(sched, None, noise, t_T)
        # one batch: the pair images at t, and the preservation term's input at T
        inputs, ts = torch.cat([x_t, x_T]), torch.cat([t, t_T])
        model = comps.denoise(inputs, ts, cond)
        with torch.no_grad(), adapters_disabled(self.unet):
            ref = comps.denoise(inputs, ts, cond)
        both = torch.cat([noise, noise])
        m_pair, target = comps.training_pair(sched, model[: 2 * b], x_t, z, both, t)
        r_pair, _ = comps.training_pair(sched, ref[: 2 * b], x_t, z, both, t)
        m_T, _ = comps.training_pair(sched, model[2 * b :], x_T, None, noise, t_T)
        r_T, _ = comps.training_pair(sched, ref[2 * b :], x_T, None, noise, t_T)
        dpo, diff = preference_loss(
            m_pair[:b], r_pair[:b], m_pair[b:], r_pair[b:], target[:b], self.beta, target_l=target[b:]
        )
        pp = output_preservation_loss(m_T, r_T)
        return {"loss": dpo + self.lambda_ * pp, "loss_dpo": dpo, "loss_pp": pp, "diff": diff.mean()}

    def training_step(self, batch, batch_idx: int):
        step = int(self.global_step)
        g = step_generator(self.seed, step)
        out = self.losses(self.pair_indices(step), g)
        self.log_dict({f"duo/{k}": v.detach() for k, v in out.items()}, on_step=True, prog_bar=False)
        self.log("duo/step", float(step), on_step=True)  # the stage's own x-axis (training.define_stage_axis)
        return out["loss"]

    def configure_optimizers(self):
        params = [p for p in self.unet.parameters() if p.requires_grad]
        return torch.optim.AdamW(
            params, lr=self.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=self.weight_decay
        )

    @torch.no_grad()
    def evaluate(self, n_draws: int = 4, seed: int = 1234) -> dict[str, float]:
        """Preference and preservation losses on fixed draws (for tests and reports)."""
        was = self.unet.training
        self.unet.eval()
        acc = {"loss_dpo": 0.0, "loss_pp": 0.0}
        for d in range(n_draws):
            g = step_generator(seed, d)
            idx = torch.randperm(len(self.unsafe_u8), generator=g)[: self.batch]
            out = self.losses(idx, g)
            acc["loss_dpo"] += float(out["loss_dpo"]) / n_draws
            acc["loss_pp"] += float(out["loss_pp"]) / n_draws
        self.unet.train(was)
        return acc


def _detached(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach()


def _scalar(t) -> int | float:
    """A timestep as a Python number (an int for SD v1, a float tensor's value for SD3)."""
    return t.item() if isinstance(t, torch.Tensor) else t


def _to_u8(images: torch.Tensor) -> torch.Tensor:
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ----------------------------------------------------------------------------- one adapter, end to end
def _condition_prompts(pairs, condition: str) -> list[str] | None:
    """The text condition of the preference term: None (``null``: the empty prompt) or each pair's
    unsafe prompt (``unsafe``, which needs a pair set that records them)."""
    if condition not in ("null", "unsafe"):
        raise UserError(f"checkpoint.condition must be null or unsafe, got '{condition}'")
    if condition == "null":
        return None
    if not isinstance(pairs, PairSet):
        raise UserError("checkpoint.condition=unsafe needs a pair set with its prompts")
    return [str(r["unsafe_prompt"]) for r in pairs.records]


def train_adapter(
    comps: Components,
    pairs: PairSet | tuple[torch.Tensor, torch.Tensor],
    hp: dict[str, Any],
    *,
    adapter_name: str,
    work_dir: Path,
    out_dir: Path | None = None,
    logger=None,
    callbacks: list | None = None,
    keep_adapter: bool = False,
) -> dict[str, Any]:
    """Train one DUO adapter on ``pairs`` and write ``out_dir/pytorch_lora_weights.safetensors``.

    ``hp``: beta, steps, batch, rank, alpha, init_lora_weights, target_modules, t_min, t_max, seed,
    weight_decay, grad_clip, checkpoint_every, precision, lr_base/lambda_base or their overrides.
    Resumes from ``work_dir`` after an interruption. The adapter is removed from the UNet afterwards
    unless ``keep_adapter``. A half-precision VAE encodes the pairs in float32 during training and is
    put back in its dtype afterwards; UNet and text encoder keep theirs (docs/methods.md 13).
    """
    paper_beta = float(hp["beta"])
    beta = effective_beta(hp, paper_beta)
    lr, lam = scaled_hyperparameters(hp, beta)
    side = hp.get("train_resolution") or comps.resolution
    unsafe, safe = pairs.images(int(side)) if isinstance(pairs, PairSet) else pairs
    prompts = _condition_prompts(pairs, str(hp["condition"]))
    add_lora(
        comps.denoiser,
        adapter_name,
        rank=int(hp["rank"]),
        alpha=float(hp["alpha"]),
        init=hp["init_lora_weights"],
        targets=list(hp["target_modules"]),
        seed=int(hp["seed"]),
    )
    try:
        with comps.in_float32("vae"):  # DUO's script keeps its VAE in float32 (docs/methods.md 13)
            module = DUO(
                comps,
                unsafe,
                safe,
                beta=beta,
                lr=lr,
                lambda_=lam,
                batch=int(hp["batch"]),
                t_min=int(hp["t_min"]),
                t_max=int(hp["t_max"]),
                weight_decay=float(hp["weight_decay"]),
                seed=int(hp["seed"]),
                prompts=prompts,
                text_length=hp.get("text_length"),
            )
            comps.denoiser.train()
            info = fit_recipe(
                module,
                hp,
                work_dir,
                label=f"DUO training ({adapter_name.removeprefix('duo_')}, beta={paper_beta:g})",
                logger=logger,
                callbacks=callbacks,
            )
        info.update(
            {"lr": lr, "lambda": lam, "beta": paper_beta, "beta_effective": beta, "adapter": adapter_name}
        )
        if out_dir is not None:
            save_lora(comps.denoiser, adapter_name, Path(out_dir), comps.family)
            copy_metrics(Path(work_dir), Path(out_dir))
    finally:
        comps.denoiser.eval()
        comps.denoiser.requires_grad_(False)
        if not keep_adapter:
            comps.denoiser.delete_adapters(adapter_name)
    return info


# ----------------------------------------------------------------------------- checkpoint=duo
def resolve_recipe(cfg: dict[str, Any], task_cfg) -> dict[str, Any]:
    """The task's DUO recipe: ``task.duo_recipe`` if the task config has one, else ``recipes[task.name]``."""
    task = dict(_plain(task_cfg) or {})
    recipe = task.get("duo_recipe") or (cfg.get("recipes") or {}).get(task.get("name"))
    if not recipe:
        known = sorted((cfg.get("recipes") or {}).keys())
        raise UserError(
            f"no DUO pair recipe for task '{task.get('name')}': add checkpoint.recipes.{task.get('name')} "
            f"or task.duo_recipe (known: {known})"
        )
    adapters = recipe.get("adapters") or []
    if not adapters:
        raise UserError(f"DUO recipe for task '{task.get('name')}' lists no adapters")
    names = [a.get("name") for a in adapters]
    if None in names or len(set(names)) != len(names):
        raise UserError(f"DUO recipe adapters need distinct names, got {names}")
    return recipe


TRAIN_KEYS = (
    "steps",
    "batch",
    "rank",
    "alpha",
    "init_lora_weights",
    "target_modules",
    "t_min",
    "t_max",
    "seed",
    "weight_decay",
    "grad_clip",
    "checkpoint_every",
    "precision",
    "lr_base",
    "lambda_base",
    "lr_override",
    "lambda_override",
    "beta_scale",
    "beta_map",
    "condition",
    "train_resolution",
    "text_length",
)
PAIR_KEYS = ("max_tries", "pair_batch", "pair_sampling")


def _pair_sampling(cfg: dict[str, Any], sample_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    sampling = {
        **dict(sample_kwargs or {}),
        **{k: v for k, v in (cfg["pair_sampling"] or {}).items() if v is not None},
    }
    sampling.pop("guidance", None)
    return sampling


def _filter_id(judge) -> str | None:
    """The filter by its profile hash (content: model sha256, classes, threshold), never its path."""
    if judge is None:
        return None
    profile = getattr(judge, "profile", None)
    return profile["hash"] if profile and "hash" in profile else getattr(judge, "name", type(judge).__name__)


def _checks(spec: dict[str, Any]) -> bool:
    return bool(spec.get("check_unsafe", True) or spec.get("check_safe", True))


def pair_set_keys(comps, cfg: dict[str, Any], recipe: dict[str, Any], *, judge=None, sample_kwargs=None):
    """Per adapter: (spec, pair recipe, sampling settings, the key of its pair set)."""
    sampling = _pair_sampling(cfg, sample_kwargs)
    out = []
    for spec in recipe["adapters"]:
        spec = dict(spec)
        pair_recipe = {
            **{k: v for k, v in spec.items() if k not in ("steps", "weight")},
            "seed": int(cfg["seed"]),
            "max_tries": int(cfg["max_tries"]),
            "batch": int(cfg["pair_batch"]),
        }
        if _checks(spec) and judge is None:
            raise UserError(
                f"DUO recipe '{spec.get('name')}' checks its pairs but checkpoint.filter is null: "
                "set a filter profile (e.g. checkpoint.filter=${task.duo_filter}) "
                "or check_unsafe/check_safe false"
            )
        pair_key = {
            "recipe": pair_recipe,
            "model": comps.key(),
            "sampling": sampling,
            "judge": _filter_id(judge) if _checks(spec) else None,
        }
        out.append((spec, pair_recipe, sampling, pair_key))
    return out


def pair_sets(
    comps: Components,
    cfg: dict[str, Any],
    recipe: dict[str, Any],
    store,
    *,
    judge=None,
    sample_kwargs: dict[str, Any] | None = None,
) -> list[tuple[dict[str, Any], Path]]:
    """Each adapter's pair set (built once, cached as ``unlearning/duo_pairs/<hash>``), in recipe order."""
    from unlearn_exp.unlearning.pairs import build_pair_set

    out = []
    for spec, pair_recipe, sampling, pair_key in pair_set_keys(
        comps, cfg, recipe, judge=judge, sample_kwargs=sample_kwargs
    ):
        folder = store.get_or_build(
            "unlearning/duo_pairs",
            pair_key,
            lambda tmp, pr=pair_recipe, sm=sampling: build_pair_set(comps, pr, judge, tmp, sm),
        )
        out.append((spec, folder))
    return out


def train_duo(
    comps: Components,
    cfg: dict[str, Any],
    recipe: dict[str, Any],
    store,
    out_dir: Path,
    work_root: Path,
    *,
    judge=None,
    sample_kwargs: dict[str, Any] | None = None,
    logger=None,
) -> dict[str, Any]:
    """Build (or reuse) each adapter's pair set and train each adapter into ``out_dir/<name>/``."""
    from unlearn_exp.unlearning.pairs import load_pair_set

    manifest = []
    for spec, folder in pair_sets(comps, cfg, recipe, store, judge=judge, sample_kwargs=sample_kwargs):
        name = str(spec["name"])
        hp = {k: cfg[k] for k in TRAIN_KEYS}
        hp["beta"] = float(cfg["beta"])
        hp["steps"] = cfg["steps"] or spec.get("steps")
        if not hp["steps"]:
            raise UserError(f"DUO adapter '{name}' has no steps: set checkpoint.steps or the recipe's steps")
        hp["steps"] = int(hp["steps"])
        info = train_adapter(
            comps,
            load_pair_set(folder),
            hp,
            adapter_name=f"duo_{name}",
            work_dir=work_root / name,
            out_dir=out_dir / name,
            logger=logger,
        )
        manifest.append(
            {
                "name": name,
                "file": f"{name}/{LORA_FILE}",
                "weight": float(spec.get("weight", 1.0)),
                "pairs": str(folder),
                **info,
            }
        )
    return {"adapters": manifest}


def duo_key(comps: Components, cfg: dict[str, Any], task_cfg, judge=None) -> dict[str, Any]:
    """The key of a trained DUO checkpoint: its recipe, the task, the base model and the pair filter."""
    recipe = resolve_recipe(cfg, task_cfg)
    recipe_cfg = without_neutral(
        "checkpoint",
        {
            k: v
            for k, v in cfg.items()
            if k not in ("path", "recipes", "adapter_weights", "allow_pickle_conversion", "filter")
        },
    )
    checked = any(_checks(dict(a)) for a in recipe["adapters"])
    return {
        "checkpoint": recipe_cfg,
        "recipe": recipe,
        "task": dict(_plain(task_cfg) or {}).get("name"),
        "model": comps.key(),
        "filter": _filter_id(judge) if checked else None,
    }


def load_adapters(comps: Components, files: list[Path], names: list[str], weights: list[float]) -> None:
    """Load LoRA files as named adapters and combine them with ``set_adapters`` (docs/methods.md 5.5)."""
    from unlearn_exp.unlearning.weights import load_lora_file

    if getattr(comps.denoiser, "peft_config", None):
        raise UserError(
            f"the model already carries adapters {sorted(comps.denoiser.peft_config)}; "
            "load one checkpoint per model"
        )
    loaded = []
    try:
        for f, n in zip(files, names):
            load_lora_file(comps.denoiser, Path(f), n, comps.family)
            loaded.append(n)
    except Exception:
        if loaded:
            comps.denoiser.delete_adapters(loaded)
        raise
    comps.denoiser.set_adapters(list(names), [float(w) for w in weights])
    comps.denoiser.requires_grad_(False)


@UNLEARNING.register("duo")
def apply_duo(
    comps: Components, cfg, store, *, task_cfg, judge=None, sample_kwargs=None, logger=None
) -> dict:
    """``checkpoint=duo``: load the user's LoRA file(s) (``path``) or train/reuse them for ``beta``."""
    from unlearn_exp.unlearning.weights import resolve_weight_file

    cfg = dict(_plain(cfg))
    s = DUOCheckpointConfig.from_cfg(cfg)  # checked and typed; the training key hashes cfg as written
    beta = s.beta
    if s.path:
        paths = s.path if isinstance(s.path, list) else [s.path]
        weights = s.adapter_weights or [1.0] * len(paths)
        files = [
            resolve_weight_file(p, store, allow_pickle_conversion=s.allow_pickle_conversion) for p in paths
        ]
        names = [f"duo_{i}_{Path(str(p)).stem}" for i, p in enumerate(paths)]
        load_adapters(comps, files, names, weights)
        shas = [file_sha256(f) for f in files]
        return {
            "method": "duo",
            "beta": beta,
            "source": "user",
            "id": adapters_id(shas, weights),
            "files": [str(f) for f in files],
            "sha256": shas,
            "adapter_weights": [float(w) for w in weights],
        }

    recipe = resolve_recipe(cfg, task_cfg)
    key = duo_key(comps, cfg, task_cfg, judge)
    final = store.path("unlearning/duo", key)
    work_root = final.parent / f"{final.name}.work"

    def build(tmp: Path) -> None:
        manifest = train_duo(
            comps,
            cfg,
            recipe,
            store,
            tmp,
            work_root,
            judge=judge,
            sample_kwargs=sample_kwargs,
            logger=logger,
        )
        atomic_write_json(tmp / "manifest.json", manifest)

    folder = store.get_or_build("unlearning/duo", key, build)
    shutil.rmtree(work_root, ignore_errors=True)

    manifest = json.loads((folder / "manifest.json").read_text())["adapters"]
    files = [folder / a["file"] for a in manifest]
    load_adapters(comps, files, [f"duo_{a['name']}" for a in manifest], [a["weight"] for a in manifest])
    shas = [file_sha256(f) for f in files]
    return {
        "method": "duo",
        "beta": beta,
        "source": "trained",
        "id": adapters_id(shas, [a["weight"] for a in manifest]),  # by content: the bits it samples with
        "files": [str(f) for f in files],
        "sha256": shas,
        "adapter_weights": [a["weight"] for a in manifest],
        "artifact": str(folder),
    }


def adapters_id(shas: list[str], weights: list[float]) -> str:
    """A DUO checkpoint by content: its LoRA files' sha256 and their adapter weights. A trained
    checkpoint and the same files loaded through ``checkpoint.path`` have the same id."""
    return config_hash({"files": list(shas), "weights": [float(w) for w in weights]})


def trained_duo_id(folder: Path) -> str:
    """The content id of a trained DUO artifact folder, read without loading a model."""
    manifest = json.loads((folder / "manifest.json").read_text())["adapters"]
    return adapters_id([file_sha256(folder / a["file"]) for a in manifest], [a["weight"] for a in manifest])


# ----------------------------------------------------------------------------- hooks (unlearning/config.py)
def _filter(filter_cfg):
    """The judge profile DUO filters its pairs with (``checkpoint.filter``), or None."""
    if not filter_cfg:
        return None
    from unlearn_exp.evaluation.judge import make_judge

    return make_judge(filter_cfg)


def unsafe_pair_images(cfg, ck: dict[str, Any], comps: Components, store) -> Path:
    """Hook ``training_images`` (``inversion.image_set.source=duo_pairs``): exactly the unsafe half of
    the pair set(s) that trained the checkpoint ``ck`` (built here if absent), as one image folder."""
    recipe = resolve_recipe(ck, cfg.task)
    sets = pair_sets(comps, ck, recipe, store, judge=_filter(ck.get("filter")))
    key = {"duo_pairs": [folder.name for _, folder in sets]}

    def build(tmp: Path):
        for _, folder in sets:
            for f in sorted((folder / "unsafe").glob("*.png")):
                shutil.copyfile(f, tmp / f"{folder.name}_{f.name}")

    return store.get_or_build("image_sets", key, build)


def built_checkpoint_id(cfg, ck: dict[str, Any], comps: Components, store) -> str | None:
    """Hook ``built_id``: the content id of the trained checkpoint ``ck`` where the cache holds it
    (named from its files, nothing loaded), else None."""
    folder = store.locate("unlearning/duo", duo_key(comps, ck, cfg.task, _filter(ck.get("filter"))))
    return trained_duo_id(folder) if folder is not None else None
