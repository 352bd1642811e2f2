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
from unlearn_exp.families import FAMILIES
from unlearn_exp.models.components import Components, Conditioning
from unlearn_exp.training import TrainedOnly, copy_metrics, fit_recipe, step_generator
from unlearn_exp.unlearning.weights import save_safetensors

WEIGHTS_FILE = "esd_unet.safetensors"
VARIANTS = ("esd-u", "esd-x", "esd-x-strict", "esd-all", "esd-self")


# SD3's MMDiT (docs/methods.md 8.1, a departure: ESD has no SD3 code): the text stream's attention
# projections are where the prompt enters attention, as cross-attention in the UNet
_TEXT_ATTENTION = (".attn.add_q_proj.", ".attn.add_k_proj.", ".attn.add_v_proj.", ".attn.to_add_out.")
_IMAGE_ATTENTION = (".attn.to_q.", ".attn.to_k.", ".attn.to_v.", ".attn.to_out.")
_MMDIT_OUTSIDE = ("pos_embed", "time_text_embed", "context_embedder", "norm_out", "proj_out")
SD3_RULES = {
    "esd-u": lambda n: not any(k in n for k in _TEXT_ATTENTION) and not n.startswith(_MMDIT_OUTSIDE),
    "esd-x": lambda n: any(k in n for k in _TEXT_ATTENTION),
    "esd-x-strict": lambda n: ".attn.add_k_proj." in n or ".attn.add_v_proj." in n,
    "esd-all": lambda n: True,
    "esd-self": lambda n: any(k in n for k in _IMAGE_ATTENTION),
}


def esd_parameter_names(unet, variant: str, family: str = "sd1") -> list[str]:
    """Trained parameters per variant (diffusers names).

    esd-u: everything but cross-attention, the time embedding and the output layers (the
    original script's ``noxattn``); esd-x: cross-attention (``attn2``); esd-x-strict: ``attn2.to_k``
    and ``attn2.to_v``; esd-all: every parameter; esd-self: self-attention (``attn1``). On SD3's
    MMDiT (``SD3_RULES``) the text stream's attention projections take cross-attention's place.
    """
    return esd_select([n for n, _ in unet.named_parameters()], variant, family)


def esd_select(names: list[str], variant: str, family: str = "sd1") -> list[str]:
    """The parameter names of ``names`` that ``variant`` trains (``esd_parameter_names``; the planner
    applies it to a model's names without building the model)."""
    names = [n for n in names if "lora_" not in n]
    rules = (
        SD3_RULES
        if family == "sd3"
        else {
            "esd-u": lambda n: (
                "attn2" not in n and not n.startswith(("time_embedding", "conv_out", "conv_norm_out"))
            ),
            "esd-x": lambda n: "attn2" in n,
            "esd-x-strict": lambda n: ".attn2.to_k." in n or ".attn2.to_v." in n,
            "esd-all": lambda n: True,
            "esd-self": lambda n: "attn1" in n,
        }
    )
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
        self.comps, self.unet = comps, comps.denoiser
        self.lr, self.eta, self.start_guidance = float(lr), float(eta), float(start_guidance)
        self.n_ddim, self.seed, self.batch, self.sample_with = int(n_ddim), int(seed), int(batch), sample_with
        self.n_train = int(comps.scheduler_config.get("num_train_timesteps", 1000))
        self.names = esd_parameter_names(self.unet, variant, comps.family)
        params = dict(self.unet.named_parameters())
        self.unet.requires_grad_(False)
        self.original = {}
        for n in self.names:
            self.original[n] = params[n].detach().clone()
            params[n].data = params[n].data.float()  # trained in fp32 (as the original scripts)
            params[n].requires_grad_(True)
        with torch.no_grad():
            emb = comps.condition_prompts([concept, ""])
        self.register_buffer("c", emb.sequence[:1].detach(), persistent=False)
        self.register_buffer("c0", emb.sequence[1:].detach(), persistent=False)
        pooled = None if emb.pooled is None else emb.pooled.detach()  # SD3's pooled vectors
        self.register_buffer("c_pooled", None if pooled is None else pooled[:1], persistent=False)
        self.register_buffer("c0_pooled", None if pooled is None else pooled[1:], persistent=False)

    def conditioning(self, which: str, n: int) -> Conditioning:
        """The concept's (``c``) or the null prompt's (``c0``) conditioning, ``n`` rows."""
        return Conditioning(getattr(self, which), getattr(self, f"{which}_pooled")).expand(n)

    def on_fit_start(self) -> None:
        self.original = {k: v.to(self.device) for k, v in self.original.items()}

    def frozen(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The original model's prediction (trained parameters swapped for their saved values)."""
        args, kwargs = self.comps.denoiser_call(x, t, cond)
        with torch.no_grad():
            return self.comps.prediction_of(functional_call(self.unet, self.original, args, kwargs))

    def trained(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The trainable model's prediction (``self.unet``: the UNet or SD3's transformer)."""
        args, kwargs = self.comps.denoiser_call(x, t, cond)
        return self.comps.prediction_of(self.unet(*args, **kwargs))

    def sampler(self):
        """DDIM with the checkpoint's schedule (SD v1, as ESD's scripts), or the family's own sampler
        (SD3's flow-matching Euler), set to ``n_ddim`` steps."""
        samplers = FAMILIES[self.comps.family].samplers
        sched = self.comps.sampling_scheduler("ddim" if "ddim" in samplers else samplers[0])
        self.comps.set_timesteps(sched, self.n_ddim, self.comps.latent_shape())
        return sched

    @torch.no_grad()
    def partial_sample(self, t_enc: int, g: torch.Generator) -> torch.Tensor:
        """Run ``t_enc`` of ``n_ddim`` DDIM steps with guidance ``start_guidance`` on the concept prompt."""
        sched = self.sampler()
        shape = (self.batch, *self.comps.latent_shape())
        x = self.comps.start_latents(sched, torch.randn(shape, generator=g).to(self.c.device, self.c.dtype))
        cond = Conditioning.cat([self.conditioning("c0", self.batch), self.conditioning("c", self.batch)])
        for t in sched.timesteps[:t_enc]:
            inp = torch.cat([x, x])
            if self.sample_with == "original":
                eps_u, eps_c = self.frozen(inp, t, cond).chunk(2)
            else:
                eps_u, eps_c = self.trained(inp, t, cond).chunk(2)
            x = sched.step(eps_u + self.start_guidance * (eps_c - eps_u), t, x).prev_sample
        return x

    def draw(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``x_t`` after ``t_enc`` sampler steps, and its timestep: a DDPM ``t`` from the DDIM step's
        interval (SD v1, as the original script), the sampler's own timestep for a flow model."""
        t_enc = int(torch.randint(0, self.n_ddim, (1,), generator=g))
        if self.comps.prediction == "flow":
            return self.partial_sample(t_enc, g), self.sampler().timesteps[t_enc].reshape(1).to(self.c.device)
        lo = round(self.n_train * t_enc / self.n_ddim)
        hi = max(lo + 1, round(self.n_train * (t_enc + 1) / self.n_ddim))
        t = torch.randint(lo, hi, (1,), generator=g).to(self.c.device)
        return self.partial_sample(t_enc, g), t

    def loss_at(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = len(x_t)
        both = Conditioning.cat([self.conditioning("c0", 1), self.conditioning("c", 1)]).repeat_interleave(b)
        e_0, e_p = self.frozen(torch.cat([x_t, x_t]), t, both).chunk(2)
        target = e_0 - self.eta * (e_p - e_0)  # on SD3 velocities (docs/methods.md 8.1)
        e_n = self.trained(x_t, t, self.conditioning("c", b))
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
    comps.denoiser.train()
    try:
        info = fit_recipe(
            module, hp, work_dir, label=f"ESD training ({hp['variant']})", logger=logger, callbacks=callbacks
        )
        if out_dir is not None:
            save_safetensors(
                module.trained_state(), Path(out_dir) / WEIGHTS_FILE, {"variant": str(hp["variant"])}
            )
            copy_metrics(Path(work_dir), Path(out_dir))
    finally:
        comps.denoiser.eval()
        comps.denoiser.requires_grad_(False)
        params = dict(comps.denoiser.named_parameters())
        for n in module.names:  # back to the model's dtype
            params[n].data = params[n].data.to(module.original[n].dtype)
    info["n_params"] = int(sum(p.numel() for p in module.trained_state().values()))
    return info
