"""SPM: one-dimensional adapters ("semi-permeable membranes", Lyu et al., CVPR 2024; docs/methods.md 8.3),
loaded from SPM's published safetensors files and fused into the UNet.

SPM's file holds, for every ``Linear`` and ``Conv2d`` inside the UNet's ``Transformer2DModel`` blocks,
``lora_unet_<module path, dots as underscores>.lora_down.weight`` (rank r, 1 for SPM),
``.lora_up.weight`` and ``.alpha``; the adapted layer computes ``W x + m (alpha / r) up(down(x))``.
A ``Conv2d``'s ``down`` has the layer's kernel and ``up`` is 1x1, so the sum is one convolution whose
kernel is ``W + m (alpha / r) up . down``: we fuse it into the weights (``checkpoint.multiplier`` =
``m``). Departure: SPM's inference also scales ``m`` per prompt by its similarity to the erased
concept ("facilitated transport"); here ``m`` is fixed.

A file that misses any layer's tensors, names a layer this UNet does not have, or has other shapes is
refused in one line.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from unlearn_exp.atomic import atomic_write_json
from unlearn_exp.errors import UserError
from unlearn_exp.families import FAMILIES
from unlearn_exp.hashing import file_sha256, to_plain
from unlearn_exp.models.components import Conditioning
from unlearn_exp.registry import UNLEARNING
from unlearn_exp.store import ArtifactStore
from unlearn_exp.training import TrainedOnly, copy_metrics, fit_recipe, step_generator
from unlearn_exp.unlearning.config import SPMCheckpointConfig

WEIGHTS_FILE = "spm.safetensors"
PREFIX = "lora_unet"
PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
# the blocks whose Linear/Conv2d layers SPM adapts, and the key prefix, by family: SD v1's as SPM's
# code (SPMNetwork); SD3's (no official code) the MMDiT's joint blocks, its transformer blocks
TARGETS = {"sd1": ("Transformer2DModel", PREFIX), "sd3": ("JointTransformerBlock", "lora_transformer")}


def spm_layers(unet, family: str = "sd1") -> dict[str, torch.nn.Module]:
    """SPM's key stem of every layer it adapts: each Linear/Conv2d inside the family's blocks
    (``TARGETS``; SD v1: every Transformer2DModel)."""
    block, prefix = TARGETS[family]
    out = {}
    for name, module in unet.named_modules():
        if type(module).__name__ != block:
            continue
        for child_name, child in module.named_modules():
            if isinstance(child, torch.nn.Linear | torch.nn.Conv2d) and child_name:
                out[f"{prefix}.{name}.{child_name}".replace(".", "_")] = child
    return out


def spm_delta(down: torch.Tensor, up: torch.Tensor, scale: float, layer: torch.nn.Module) -> torch.Tensor:
    """``scale * up . down`` in the shape of ``layer.weight``."""
    w = layer.weight
    if isinstance(layer, torch.nn.Linear):
        if down.shape[1] != w.shape[1] or up.shape[0] != w.shape[0] or up.shape[1] != down.shape[0]:
            raise ValueError(f"down {tuple(down.shape)} / up {tuple(up.shape)} for weight {tuple(w.shape)}")
        return scale * (up.double() @ down.double())
    if down.ndim != 4 or up.ndim != 4 or up.shape[2:] != (1, 1):
        raise ValueError(f"conv adapter down {tuple(down.shape)} / up {tuple(up.shape)}")
    r = down.shape[0]
    if down.shape[1:] != w.shape[1:] or up.shape[0] != w.shape[0] or up.shape[1] != r:
        raise ValueError(f"down {tuple(down.shape)} / up {tuple(up.shape)} for weight {tuple(w.shape)}")
    return scale * (up[:, :, 0, 0].double() @ down.reshape(r, -1).double()).reshape(w.shape)


def fuse_spm(
    unet, tensors: dict[str, torch.Tensor], multiplier: float, what: str, family: str = "sd1"
) -> int:
    """Add every adapter into its layer's weight; refuse partial or mismatched files (one line)."""
    layers = spm_layers(unet, family)
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    unknown = sorted(s for s in stems if s not in layers)
    if unknown:
        raise UserError(
            f"{what} names {len(unknown)} layer(s) this UNet does not have (e.g. {', '.join(unknown[:2])}): "
            "an SPM file for another architecture?"
        )
    missing = sorted(s for s in layers if any(f"{s}.{p}" not in tensors for p in PARTS))
    if missing:
        raise UserError(
            f"{what} is partial: {len(missing)} of {len(layers)} adapted layers lack lora_down/lora_up/alpha "
            f"(e.g. {missing[0]})"
        )
    deltas = {}
    for stem, layer in layers.items():
        down, up = tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"]
        alpha = float(tensors[f"{stem}.alpha"])
        rank = down.shape[0]
        scale = float(multiplier) * (alpha if alpha else rank) / rank
        try:
            deltas[stem] = spm_delta(down, up, scale, layer)
        except ValueError as e:
            raise UserError(f"{what}: layer {stem} does not fit this UNet ({e})") from None
    with torch.no_grad():
        for stem, layer in layers.items():
            layer.weight.add_(deltas[stem].to(layer.weight.dtype))
    return len(layers)


@UNLEARNING.register("spm")
def apply_spm(comps, cfg, store, *, task_cfg, judge=None, sample_kwargs=None, logger=None) -> dict[str, Any]:
    """``checkpoint=spm``: train SPM's adapters (cached) or load SPM's file (``checkpoint.path``), and fuse
    them into the denoiser at ``checkpoint.multiplier``."""
    from unlearn_exp.unlearning.checkpoints import spm_key
    from unlearn_exp.unlearning.weights import read_safetensors, resolve_weight_file

    s = SPMCheckpointConfig.from_cfg(cfg)
    multiplier = s.multiplier
    extra: dict[str, Any] = {}
    if s.path:
        f = resolve_weight_file(s.path, store, allow_pickle_conversion=s.allow_pickle_conversion)
        source = "user"
    else:
        store = store if isinstance(store, ArtifactStore) else ArtifactStore(store)
        key = spm_key(comps, dict(to_plain(cfg)), dict(to_plain(task_cfg) or {}))
        final = store.path("unlearning/spm", key)
        work = final.parent / f"{final.name}.work"

        def build(tmp) -> None:
            train_spm(comps, key["concept"], key["checkpoint"], work_dir=work, out_dir=tmp, logger=logger)

        folder = store.get_or_build("unlearning/spm", key, build)
        shutil.rmtree(work, ignore_errors=True)
        f = folder / WEIGHTS_FILE
        source, extra = "trained", {"concept": key["concept"], "artifact": str(folder)}
    n = fuse_spm(comps.denoiser, read_safetensors(f), multiplier, f"SPM checkpoint '{f.name}'", comps.family)
    sha = file_sha256(f)
    return {
        "method": "spm",
        "beta": None,
        "source": source,
        "id": f"{sha[:16]}x{multiplier:g}",
        "files": [str(f)],
        "sha256": [sha],
        "multiplier": multiplier,
        "n_layers": n,
        **extra,
    }


def train_spm(comps, concept: str, hp: dict[str, Any], *, work_dir: Path, out_dir: Path, logger=None) -> dict:
    """Train SPM's adapters on ``comps`` (left unchanged) and write ``out_dir/spm.safetensors`` in SPM's
    layout, which ``fuse_spm`` reads as it reads SPM's published files."""
    from unlearn_exp.unlearning.weights import save_safetensors

    module = SPM(comps, concept, hp)
    try:
        info = fit_recipe(module, hp, work_dir, label="SPM training", logger=logger)
        save_safetensors(module.trained_state(), Path(out_dir) / WEIGHTS_FILE, {"concept": concept})
        copy_metrics(Path(work_dir), Path(out_dir))
        atomic_write_json(Path(out_dir) / "manifest.json", {"concept": concept, **info})
    finally:
        module.remove()
        comps.denoiser.eval()
        comps.denoiser.requires_grad_(False)
    return info


# ----------------------------------------------------------------------------- training (docs/methods.md 8.3)
class SPMAdapter(torch.nn.Module):
    """One layer's adapter as SPM's ``SPMLayer``: ``down`` (rank r; a Conv2d's with the layer's kernel,
    stride and padding), ``up`` (1x1 for a Conv2d), ``down`` Kaiming-uniform (a = sqrt 5), ``up`` zero;
    the layer's output gains ``multiplier * (alpha / r) * up(down(x))``."""

    def __init__(self, layer: torch.nn.Module, rank: int, alpha: float):
        super().__init__()
        if isinstance(layer, torch.nn.Linear):
            self.lora_down = torch.nn.Linear(layer.in_features, rank, bias=False)
            self.lora_up = torch.nn.Linear(rank, layer.out_features, bias=False)
        else:
            rank = min(rank, layer.in_channels, layer.out_channels)
            self.lora_down = torch.nn.Conv2d(
                layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, bias=False
            )
            self.lora_up = torch.nn.Conv2d(rank, layer.out_channels, (1, 1), (1, 1), bias=False)
        torch.nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_up.weight)
        alpha = rank if not alpha else alpha
        self.scale = float(alpha) / rank
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.multiplier = 0.0

    def hook(self, module, inputs, output):
        if not self.multiplier:
            return output
        x = inputs[0].to(self.lora_down.weight.dtype)
        return output + (self.lora_up(self.lora_down(x)) * self.multiplier * self.scale).to(output.dtype)


def spm_scheduler(comps):
    """SPM's noise scheduler: DDIM with the model's betas and DDIMScheduler's own defaults otherwise
    (as SPM's ``create_noise_scheduler``); a flow model's own sampler (SD3)."""
    if comps.prediction == "flow":
        return comps.sampling_scheduler(FAMILIES[comps.family].samplers[0])
    c = comps.scheduler_config
    return DDIMScheduler(
        beta_start=c["beta_start"],
        beta_end=c["beta_end"],
        beta_schedule=c["beta_schedule"],
        num_train_timesteps=c["num_train_timesteps"],
        clip_sample=False,
    )


@dataclass
class SPMDraw:
    """One step's randomness: the partial sampling's length, its start, the anchors' embeddings."""

    steps_to: int
    latents: torch.Tensor
    anchors: Conditioning  # the latent-anchoring rows (sample_anchors)


class SPM(TrainedOnly, L.LightningModule):
    """SPM training (docs/methods.md 8.3), as SPM's ``train_spm.py`` (SD v1; SD3 as its SDXL script
    ``train_spm_xl.py`` carries pooled vectors): adapters on ``spm_layers``; per step a partial
    sampling with the adapters on (classifier-free guidance ``start_guidance``, ``steps_to`` of
    ``max_denoising_steps``), then at the matching one of 1000 timesteps::

        L = MSE(e_spm(x, c_target), e(x, c_neutral) - g (e(x, c_positive) - e(x, c_neutral)))
            + la_strength MSE(e_spm(x, anchors), e(x, anchors))

    ``e`` the original model (adapters off), ``anchors`` random embeddings drawn near the target's norm
    (``sample_anchors``)."""

    metric_prefix = "spm"

    def __init__(self, comps, concept: str, hp: dict[str, Any]):
        super().__init__()
        if not concept:
            raise UserError("SPM needs a concept prompt")
        self.comps, self.unet = comps, comps.denoiser
        self.hp = {k: hp[k] for k in HP_KEYS}
        self.unet.requires_grad_(False)
        layers = spm_layers(self.unet, comps.family)
        if not layers:
            raise UserError(f"SPM: the {comps.family} denoiser has no {TARGETS[comps.family][0]} blocks")
        rank, alpha = int(hp["rank"]), float(hp["alpha"])
        self.adapters = torch.nn.ModuleDict({stem: SPMAdapter(m, rank, alpha) for stem, m in layers.items()})
        self.handles = [m.register_forward_hook(self.adapters[s].hook) for s, m in layers.items()]
        with torch.no_grad():
            emb = comps.condition_prompts([concept, concept, "", ""])  # target, positive, neutral, uncond
        self.scheduler_ = spm_scheduler(comps)  # set anew at every step (set_timesteps)
        names = ("target", "positive", "neutral", "uncond")
        self.prompts = {name: _row(emb, i) for i, name in enumerate(names)}

    def adapted(self, on: bool) -> None:
        for a in self.adapters.values():
            a.multiplier = 1.0 if on else 0.0

    def predict(self, x: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
        return self.comps.denoise(self.comps.model_input(self.scheduler_, x, t), t, cond)

    def draw(self, g: torch.Generator) -> SPMDraw:
        n = int(self.hp["max_denoising_steps"])
        steps_to = int(torch.randint(1, n, (1,), generator=g))
        shape = (int(self.hp["batch"]), *self.comps.latent_shape(self.hp["resolution"]))
        latents = torch.randn(shape, generator=g)
        n_anchor = int(self.hp["sampling_batch_size"])
        anchors = sample_anchors(self.prompts["target"], self.prompts["uncond"], n_anchor, g)
        return SPMDraw(steps_to, latents, anchors)

    def loss_at(self, d: SPMDraw) -> torch.Tensor:
        hp, comps, dev = self.hp, self.comps, self.prompts["target"].sequence.device
        b, n = int(hp["batch"]), int(hp["max_denoising_steps"])
        sched = self.scheduler_
        with torch.no_grad():
            comps.set_timesteps(sched, n, d.latents.shape[1:])
            x = comps.start_latents(sched, d.latents.to(dev))
            pair = Conditioning.cat([self.prompts["uncond"].expand(b), self.prompts["target"].expand(b)])
            self.adapted(True)
            for t in sched.timesteps[: d.steps_to]:
                e_u, e_c = self.predict(torch.cat([x, x]), t, pair).chunk(2)
                x = sched.step(e_u + float(hp["start_guidance"]) * (e_c - e_u), t, x).prev_sample
            self.adapted(False)
            comps.set_timesteps(sched, 1000, d.latents.shape[1:])
            t = sched.timesteps[int(d.steps_to * 1000 / n)]
            positive = self.predict(x, t, self.prompts["positive"].expand(b))
            neutral = self.predict(x, t, self.prompts["neutral"].expand(b))
        self.adapted(True)
        target = self.predict(x, t, self.prompts["target"].expand(b))
        loss = F.mse_loss(
            target.float(), (neutral - float(hp["guidance_scale"]) * (positive - neutral)).float()
        )
        if float(hp["la_strength"]):
            anchors = d.anchors.to(dev)
            xa = x.repeat(len(anchors) // b, *[1] * (x.ndim - 1))
            anchor = self.predict(xa, t, anchors)
            self.adapted(False)
            with torch.no_grad():
                original = self.predict(xa, t, anchors)
            loss = loss + float(hp["la_strength"]) * F.mse_loss(anchor.float(), original.float())
        self.adapted(False)
        return loss

    def training_step(self, batch, batch_idx: int):
        loss = self.loss_at(self.draw(step_generator(int(self.hp["seed"]), int(self.global_step))))
        if not torch.isfinite(loss):
            raise UserError(
                f"SPM: the loss is {float(loss)} at step {int(self.global_step)}; lower checkpoint.lr"
            )
        self.log("spm/loss", loss.detach(), on_step=True)
        self.log("spm/step", float(self.global_step), on_step=True)
        return loss

    def configure_optimizers(self):
        from diffusers.optimization import get_scheduler

        params = list(self.adapters.parameters())
        opt = torch.optim.AdamW(params, lr=float(self.hp["lr"]), weight_decay=0.01)  # bitsandbytes' default
        sched = get_scheduler(
            "cosine_with_restarts",
            opt,
            num_warmup_steps=int(self.hp["lr_warmup_steps"]),
            num_training_steps=int(self.hp["steps"]),
            num_cycles=int(self.hp["lr_cycles"]),
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The adapters in SPM's file layout: ``<stem>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``."""
        return {
            f"{stem}.{k}": v.detach() for stem, a in self.adapters.items() for k, v in a.state_dict().items()
        }

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


HP_KEYS = (
    "rank",
    "alpha",
    "lr",
    "lr_warmup_steps",
    "lr_cycles",
    "steps",
    "max_denoising_steps",
    "start_guidance",
    "guidance_scale",
    "la_strength",
    "sampling_batch_size",
    "batch",
    "resolution",
    "seed",
)


def sample_anchors(target: Conditioning, uncond: Conditioning, n: int, g: torch.Generator) -> Conditioning:
    """SPM's latent-anchoring rows (``src/engine/sampling.py``): ``n`` embeddings ``s`` are drawn, each a
    Gaussian direction accepted with probability ``1 - cos(s, target)`` and scaled to ``U[0.8, 1.2)``
    times the target's norm (each part apart: SD3's sequence and pooled vector, as ``sample_xl``), and
    interleaved with the unconditional embedding, ``[u, s_1, u, s_2, ...]``. SPM's step evaluates these
    ``2n`` rows as one classifier-free guided batch at scale 1, which keeps its second half: the ``n``
    rows returned here (for n = 4: ``[u, s_3, u, s_4]``)."""

    def one(part: torch.Tensor) -> torch.Tensor:
        while True:
            noise = torch.randn(part.shape, generator=g).to(part)
            noise = noise / noise.reshape(-1).norm()
            sim = torch.cosine_similarity(part.reshape(-1), noise.reshape(-1), dim=0)
            if float(torch.rand((), generator=g)) < 1 - float(sim):
                break
        return (float(torch.rand((), generator=g)) * 0.4 + 0.8) * noise * part.reshape(-1).norm()

    rows = []
    for _ in range(n):
        s = Conditioning(one(target.sequence), None if target.pooled is None else one(target.pooled))
        rows += [uncond, s]
    return Conditioning.cat(rows[n:])


def _row(emb: Conditioning, i: int) -> Conditioning:
    return Conditioning(emb.sequence[i : i + 1], None if emb.pooled is None else emb.pooled[i : i + 1])
