"""UnlearnDiffAtk (Zhang et al., ECCV 2024; docs/methods.md 12.2): K adversarial prompt tokens,
optimised against the *unlearned* model (and, optionally, its guidance) so that its denoising of a
target harmful image succeeds.

For a target image ``x_0`` (latent ``z_0``), the attack prepends K tokens ``a_1..a_K`` to the prompt
and minimises ``E_{t, eps} || eps_hat(z_t, t, [a; P]) - eps ||^2`` with ``z_t`` the noised target. With
``guidance`` set, ``eps_hat`` is that guidance's combined prediction (SLD, SAFREE, with the words or
``C*``), so the attack sees the defence; without it, the conditional prediction. The tokens are
discrete: each step projects the continuous rows to their nearest vocabulary rows (cosine), runs the
loss with the projected rows and passes the gradient straight through to the continuous ones (as in
the paper's projected-gradient search). The result is the best projected prompt seen.

``UnlearnDiffAtk`` is a LightningModule (one optimiser step per training step); ``attack`` runs it with
a Trainer and caches the prompt per (model, checkpoint, guidance, concept, target image, seed, settings)
in the store as ``attacks/unlearndiffatk/<hash>``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from unlearn_exp.atomic import atomic_write_json
from unlearn_exp.attacks.config import UnlearnDiffAtkConfig
from unlearn_exp.errors import UserError
from unlearn_exp.guidance.base import Guidance
from unlearn_exp.inversion.textual_inversion import (
    LearnedRowsEmbedding,
    add_placeholder_tokens,
    token_ids,
    with_learned_rows,
)
from unlearn_exp.progress import lightning_bar
from unlearn_exp.quiet import quiet_lightning
from unlearn_exp.runtime import keep_freed_memory

RESULT_FILE = "attack.json"


class ProjectedRows(LearnedRowsEmbedding):
    """Placeholder rows used as their nearest vocabulary rows (cosine), gradient straight through."""

    def __init__(self, base: torch.nn.Embedding, ids: list[int], vocab: torch.Tensor):
        super().__init__(base, ids)
        self.register_buffer("vocab", vocab.long().to(base.weight.device))

    def projected_ids(self) -> torch.Tensor:
        table = F.normalize(self.base.weight[self.vocab].float(), dim=-1)
        return self.vocab[(F.normalize(self.learned.float(), dim=-1) @ table.T).argmax(-1)]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hard = self.base.weight[self.projected_ids()].float()
        rows = self.learned + (hard - self.learned).detach()  # straight-through
        return with_learned_rows(self.base, self.ids, rows, input_ids)


class MirroredRows(torch.nn.Module):
    """Another CLIP encoder of the same vocabulary (SD3's CLIP-G): the placeholders read that encoder's
    own rows of the owner's current projected ids (no gradient: the search runs through the owner)."""

    def __init__(self, base: torch.nn.Embedding, ids: list[int], owner: ProjectedRows):
        super().__init__()
        self.base = base
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long, device=base.weight.device))
        self._owner = [owner]  # a list: not a submodule

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.base.weight[self._owner[0].projected_ids().to(self.base.weight.device)]
        return with_learned_rows(self.base, self.ids, rows, input_ids)


@dataclass
class AttackSettings:
    """The optimisation's settings: ``conf/attack/unlearndiffatk.yaml`` (k, steps, lr, weight_decay,
    seed) and the cell's sampler (guidance_scale, num_steps: the guidance's step-dependent behaviour)."""

    k: int
    steps: int
    lr: float
    weight_decay: float
    guidance_scale: float
    num_steps: int
    seed: int

    @classmethod
    def from_cfg(cls, attack_cfg, *, guidance_scale: float, num_steps: int) -> AttackSettings:
        """From an ``attack`` config (checked by its typed config; ``n_targets`` is the stage's)."""
        s = UnlearnDiffAtkConfig.from_cfg(attack_cfg)
        return cls(s.k, s.steps, s.lr, s.weight_decay, float(guidance_scale), int(num_steps), s.seed)


class UnlearnDiffAtk(L.LightningModule):
    """The attack's optimisation (module docstring); ``best_prompt`` after fitting."""

    def __init__(self, comps, target: torch.Tensor, prompt: str, settings: AttackSettings, guidance=None):
        super().__init__()
        if target.ndim != 4 or target.shape[0] != 1 or target.shape[1] != 3:
            raise UserError(
                f"UnlearnDiffAtk needs one RGB target image (1, 3, H, W), got {tuple(target.shape)}"
            )
        self.comps, self.s, self.prompt = comps, settings, prompt
        self.guidance = guidance or Guidance()
        comps.freeze()
        self.unet, self.text_encoder = comps.denoiser, comps.text_encoder
        tokens = add_placeholder_tokens(
            comps, f"<adv{len(comps.tokenizer)}>", settings.k, "a"
        )  # a fresh name
        self.tokens = tokens
        table = comps.text_encoder.get_input_embeddings()
        vocab = torch.tensor(_ordinary_vocabulary(comps, len(tokens)))
        self.rows = ProjectedRows(table, token_ids(comps, tokens), vocab)
        g = torch.Generator().manual_seed(settings.seed)
        with torch.no_grad():  # random vocabulary rows to start from
            start = vocab[torch.randint(len(vocab), (settings.k,), generator=g)]
            self.rows.learned.copy_(table.weight[start].float())
        comps.text_encoder.set_input_embeddings(self.rows)
        self._mirror_rows(comps, tokens)
        with torch.no_grad():
            z = target.to(comps.device, comps.dtype)
            if comps.vae is not None:
                z = (comps.vae.encode(z).latent_dist.mean - comps.latent_shift) * comps.latent_scale
        self.register_buffer("z0", z.float(), persistent=False)
        self.noise_scheduler = comps.training_scheduler()
        self.T = int(self.noise_scheduler.config.num_train_timesteps)
        self.best_loss, self.best_prompt, self.losses = float("inf"), "", []

    @staticmethod
    def _mirror_rows(comps, tokens: list[str]) -> None:
        """SD3 (docs/methods.md 12.2): CLIP-G, whose vocabulary is CLIP-L's, reads the projected words'
        own rows; T5 (another vocabulary) is given the decoded words as text (``tokens_for``)."""
        for key, tok, enc in comps.text_encoder_slots()[1:]:
            if key == "clip_g":
                owner = comps.text_encoder.get_input_embeddings()
                enc.set_input_embeddings(
                    MirroredRows(enc.get_input_embeddings(), token_ids(comps, tokens, tok), owner)
                )

    def adversarial_prompt(self) -> str:
        return " ".join(self.tokens) + " " + self.prompt

    def words(self) -> str:
        """The adversarial tokens as the words they project to."""
        return self.comps.tokenizer.decode(self.rows.projected_ids().tolist()).strip()

    def tokens_for(self, prompts: list[str]):
        """The prompt's ids for every encoder; an encoder of another vocabulary (SD3's T5) reads the
        projected words as text instead of the placeholders."""
        tokens = self.comps.tokenize(prompts)
        if "t5" in tokens.more:
            text = [f"{self.words()} {self.prompt}".strip()] * len(prompts)
            tokens.more["t5"] = self.comps.tokenize(text).more["t5"]
        return tokens

    def loss_at(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.s.seed * 1_000_003 + step)
        noise = torch.randn(self.z0.shape, generator=g).to(self.z0)
        comps, sched = self.comps, self.noise_scheduler
        t = comps.training_timesteps(sched, 1, 1, self.T, g).to(self.z0.device)  # SD v1: U{0..T-1}
        z_t = comps.training_input(sched, self.z0, noise, t)
        prompts = [self.adversarial_prompt()]
        state = self.guidance.prepare(
            self.comps, prompts, self.tokens_for(prompts), None, self.s.guidance_scale, self.s.num_steps
        )
        i = min(self.s.num_steps - 1, int((1 - float(t) / self.T) * self.s.num_steps))  # the sampler's step
        emb = self.guidance.embeddings(i, state)
        n = state.n_branches
        with self.guidance.unet_hooks(i, state, self.unet):
            out = self.comps.denoise(
                z_t.repeat(n, 1, 1, 1).to(self.comps.dtype), t.repeat(n), emb.to(self.comps.dtype)
            )
        preds = list(out.float().chunk(n))
        eps = preds[1] if type(self.guidance) is Guidance else self.guidance.combine(i, preds, state)
        pred, target = comps.training_pair(sched, eps, z_t, self.z0, noise, t)  # SD3: x0 estimates
        return F.mse_loss(pred, target)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.loss_at(int(self.global_step))
        if not loss.requires_grad:
            raise UserError(
                f"guidance '{self.guidance.name}' cuts the gradient to the prompt: it cannot be attacked"
            )
        value = float(loss.detach())
        self.losses.append(value)
        if value < self.best_loss:
            self.best_loss, self.best_prompt = value, f"{self.words()} {self.prompt}".strip()
        self.log("attack/loss", loss.detach(), on_step=True, batch_size=1)
        self.log("attack/step", float(self.global_step), on_step=True, batch_size=1)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([self.rows.learned], lr=self.s.lr, weight_decay=self.s.weight_decay)

    def restore(self) -> None:
        """Put the plain token tables back (the placeholder rows stay unused)."""
        for _, _, enc in self.comps.text_encoder_slots()[1:]:
            table = enc.get_input_embeddings()
            if isinstance(table, MirroredRows):
                enc.set_input_embeddings(table.base)
        with torch.no_grad():  # the rows into the plain table, as merge_learned_rows does
            self.rows.base.weight[self.rows.ids] = self.rows.learned.detach().to(self.rows.base.weight)
        self.comps.text_encoder.set_input_embeddings(self.rows.base)


def _ordinary_vocabulary(comps, n_added: int) -> list[int]:
    """The tokenizer's own words: no special token, and no token added to it (this attack's, an
    earlier attack's on the same model, or a learned concept's ``<c*>``)."""
    tok = comps.tokenizer
    special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    return [i for i in range(min(tok.vocab_size, len(tok) - n_added)) if i not in special]


def run_attack(
    comps, target: torch.Tensor, prompt: str, settings: AttackSettings, guidance=None
) -> dict[str, Any]:
    """Fit the attack; returns the best prompt, its loss and the loss curve."""
    from unlearn_exp.training import StepIndex, StopOnSigterm, keeps_device

    keep_freed_memory()
    quiet_lightning()
    module = UnlearnDiffAtk(comps, target, prompt, settings, guidance)
    trainer = L.Trainer(
        max_steps=settings.steps,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            StopOnSigterm(),
            lightning_bar(f"UnlearnDiffAtk ({module.guidance.name})", settings.steps, "step"),
        ],
        num_sanity_val_steps=0,
    )
    loader = torch.utils.data.DataLoader(StepIndex(settings.steps), batch_size=1)
    try:
        with keeps_device(comps):  # Lightning leaves its module (and the model) on the CPU
            trainer.fit(module, loader)
    finally:
        module.restore()
    return {
        "prompt": module.best_prompt,
        "loss": module.best_loss,
        "losses": module.losses,
        "first_loss": module.losses[0] if module.losses else None,
    }


def attack(
    comps,
    store,
    key: dict[str, Any],
    target: torch.Tensor,
    prompt: str,
    settings: AttackSettings,
    guidance=None,
) -> dict[str, Any]:
    """``run_attack`` cached in ``store`` under ``key`` (model, checkpoint, guidance, concept, target,
    seed)."""

    def build(tmp: Path) -> None:
        atomic_write_json(tmp / RESULT_FILE, run_attack(comps, target, prompt, settings, guidance))

    folder = store.get_or_build(
        "attacks/unlearndiffatk", {**key, "settings": vars(settings), "prompt": prompt}, build
    )
    return json.loads((folder / RESULT_FILE).read_text())
