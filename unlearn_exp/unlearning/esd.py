"""ESD: Erased Stable Diffusion (docs/methods.md 8.1), variants esd-u and esd-x.

The UNet is fine-tuned in place (a chosen subset of its parameters) so that its prediction for
the concept prompt ``c`` matches the negatively guided prediction of the frozen original::

    x_t    = partial DDIM sample (guidance start_guidance, prompt c) from pure noise, t_enc of n_ddim steps
    target = eps_theta(x_t, t, c_0) - eta * (eps_theta(x_t, t, c) - eps_theta(x_t, t, c_0))
    L      = MSE(eps_theta*(x_t, t, c), target)

The frozen original is the same UNet evaluated with the saved original values of the trained
parameters (``torch.func.functional_call``), so only the trained subset is held twice.
``x_t`` is sampled with the frozen original, as docs/methods.md 8.1 states (``sample_with: trained``
switches to the trainable copy). The DDPM timestep is drawn from the DDIM step's interval
``[round(1000 t_enc / n_ddim), round(1000 (t_enc + 1) / n_ddim))``, as the original script does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.func import functional_call

from unlearn_exp.errors import UserError
from unlearn_exp.models.components import Components
from unlearn_exp.training import TrainedOnly, copy_metrics, fit, step_generator
from unlearn_exp.unlearning.weights import save_safetensors

WEIGHTS_FILE = "esd_unet.safetensors"
VARIANTS = ("esd-u", "esd-x", "esd-x-strict", "esd-all", "esd-self")


def esd_parameter_names(unet, variant: str) -> list[str]:
    """Trained parameters per variant (diffusers names).

    esd-u: everything but cross-attention, the time embedding and the output layers (the
    original script's ``noxattn``); esd-x: cross-attention (``attn2``); esd-x-strict: ``attn2.to_k``
    and ``attn2.to_v``; esd-all: every parameter; esd-self: self-attention (``attn1``).
    """
    names = [n for n, _ in unet.named_parameters() if "lora_" not in n]
    rules = {
        "esd-u": lambda n: (
            "attn2" not in n and not n.startswith(("time_embedding", "conv_out", "conv_norm_out"))
        ),
        "esd-x": lambda n: "attn2" in n,
        "esd-x-strict": lambda n: ".attn2.to_k." in n or ".attn2.to_v." in n,
        "esd-all": lambda n: True,
        "esd-self": lambda n: "attn1" in n,
    }
    if variant not in rules:
        raise UserError(f"unknown ESD variant '{variant}': choose one of {list(VARIANTS)}")
    chosen = [n for n in names if rules[variant](n)]
    if not chosen:
        raise UserError(f"ESD variant '{variant}' selects no parameter of this UNet")
    return chosen


class ESD(TrainedOnly, L.LightningModule):
    """ESD fine-tuning of a parameter subset of ``comps.unet`` (docs/methods.md 8.1)."""

    metric_prefix = "esd"

    def __init__(
        self,
        comps: Components,
        concept: str,
        *,
        variant: str = "esd-u",
        lr: float = 1e-5,
        eta: float = 1.0,
        start_guidance: float = 3.0,
        n_ddim: int = 50,
        seed: int = 42,
        batch: int = 1,
        sample_with: str = "original",
    ):
        super().__init__()
        if not concept:
            raise UserError("ESD needs a concept prompt")
        if sample_with not in ("original", "trained"):
            raise UserError(f"esd sample_with must be 'original' or 'trained', got '{sample_with}'")
        self.comps, self.unet = comps, comps.unet
        self.lr, self.eta, self.start_guidance = float(lr), float(eta), float(start_guidance)
        self.n_ddim, self.seed, self.batch, self.sample_with = int(n_ddim), int(seed), int(batch), sample_with
        self.n_train = int(comps.scheduler_config.get("num_train_timesteps", 1000))
        self.names = esd_parameter_names(comps.unet, variant)
        params = dict(comps.unet.named_parameters())
        comps.unet.requires_grad_(False)
        self.original = {}
        for n in self.names:
            self.original[n] = params[n].detach().clone()
            params[n].data = params[n].data.float()  # trained in fp32 (as the original scripts)
            params[n].requires_grad_(True)
        with torch.no_grad():
            emb, _ = comps.encode_prompts([concept, ""])
        self.register_buffer("c", emb[:1].detach(), persistent=False)
        self.register_buffer("c0", emb[1:].detach(), persistent=False)

    def on_fit_start(self) -> None:
        self.original = {k: v.to(self.device) for k, v in self.original.items()}

    def frozen(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The original model's prediction (trained parameters swapped for their saved values)."""
        with torch.no_grad():
            return functional_call(self.unet, self.original, (x, t), {"encoder_hidden_states": emb}).sample

    @torch.no_grad()
    def partial_sample(self, t_enc: int, g: torch.Generator) -> torch.Tensor:
        """Run ``t_enc`` of ``n_ddim`` DDIM steps with guidance ``start_guidance`` on the concept prompt."""
        from diffusers import DDIMScheduler

        sched = DDIMScheduler.from_config(self.comps.scheduler_config)
        sched.set_timesteps(self.n_ddim, device=self.c.device)
        shape = (self.batch, *self.comps.latent_shape())
        x = torch.randn(shape, generator=g).to(self.c.device, self.c.dtype) * sched.init_noise_sigma
        emb = torch.cat([self.c0.expand(self.batch, -1, -1), self.c.expand(self.batch, -1, -1)])
        for t in sched.timesteps[:t_enc]:
            inp = torch.cat([x, x])
            if self.sample_with == "original":
                eps_u, eps_c = self.frozen(inp, t, emb).chunk(2)
            else:
                eps_u, eps_c = self.unet(inp, t, encoder_hidden_states=emb).sample.chunk(2)
            x = sched.step(eps_u + self.start_guidance * (eps_c - eps_u), t, x).prev_sample
        return x

    def draw(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        t_enc = int(torch.randint(0, self.n_ddim, (1,), generator=g))
        lo = round(self.n_train * t_enc / self.n_ddim)
        hi = max(lo + 1, round(self.n_train * (t_enc + 1) / self.n_ddim))
        t = torch.randint(lo, hi, (1,), generator=g).to(self.c.device)
        return self.partial_sample(t_enc, g), t

    def loss_at(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = len(x_t)
        e_0, e_p = self.frozen(
            torch.cat([x_t, x_t]), t, torch.cat([self.c0, self.c]).repeat_interleave(b, 0)
        ).chunk(2)
        target = e_0 - self.eta * (e_p - e_0)
        e_n = self.unet(x_t, t, encoder_hidden_states=self.c.expand(b, -1, -1)).sample
        return F.mse_loss(e_n.float(), target.float())

    def training_step(self, batch, batch_idx: int):
        x_t, t = self.draw(step_generator(self.seed, int(self.global_step)))
        loss = self.loss_at(x_t, t)
        self.log("esd/loss", loss.detach(), on_step=True)
        self.log("esd/step", float(self.global_step), on_step=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.unet.parameters() if p.requires_grad], lr=self.lr)

    def trained_state(self) -> dict[str, torch.Tensor]:
        params = dict(self.unet.named_parameters())
        return {n: params[n].detach() for n in self.names}


def train_esd(
    comps: Components,
    concept: str,
    hp: dict[str, Any],
    *,
    work_dir: Path,
    out_dir: Path | None = None,
    logger=None,
    callbacks: list | None = None,
) -> dict[str, Any]:
    """Fine-tune ``comps.unet`` in place and write ``out_dir/esd_unet.safetensors`` (trained params).

    ``hp``: the training keys of ``conf/checkpoint/esd.yaml`` (all of them: the YAML holds the values)."""
    module = ESD(
        comps,
        concept,
        variant=str(hp["variant"]),
        lr=float(hp["lr"]),
        eta=float(hp["eta"]),
        start_guidance=float(hp["start_guidance"]),
        n_ddim=int(hp["ddim_steps"]),
        seed=int(hp["seed"]),
        batch=int(hp["batch"]),
        sample_with=str(hp["sample_with"]),
    )
    comps.unet.train()
    try:
        info = fit(
            module,
            steps=int(hp["steps"]),
            work_dir=Path(work_dir),
            checkpoint_every=int(hp["checkpoint_every"]),
            grad_clip=hp["grad_clip"],
            precision=str(hp["precision"]),
            logger=logger,
            callbacks=callbacks,
            label=f"ESD training ({hp['variant']})",
        )
        if out_dir is not None:
            save_safetensors(
                module.trained_state(), Path(out_dir) / WEIGHTS_FILE, {"variant": str(hp["variant"])}
            )
            copy_metrics(Path(work_dir), Path(out_dir))
    finally:
        comps.unet.eval()
        comps.unet.requires_grad_(False)
        params = dict(comps.unet.named_parameters())
        for n in module.names:  # back to the model's dtype
            params[n].data = params[n].data.to(module.original[n].dtype)
    info["n_params"] = int(sum(p.numel() for p in module.trained_state().values()))
    return info
