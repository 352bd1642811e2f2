"""UCE: Unified Concept Editing, the closed-form edit of cross-attention (docs/methods.md 8.2).

For every cross-attention projection ``W_old`` (``attn2.to_k``, ``attn2.to_v``)::

    W_new = ( lamb W_old + s_e sum_i v*_i c_i^T + s_p sum_j (W_old c_j) c_j^T )
            ( lamb I     + s_e sum_i c_i c_i^T  + s_p sum_j c_j c_j^T )^{-1}

with ``c`` the text-encoder output at the last real token of a concept string and
``v*_i = W_old c_guide(i)`` the guide concept's output under the original weights. Computed in fp32.
"""

from __future__ import annotations

from typing import Any

import torch

from unlearn_exp.errors import UserError
from unlearn_exp.models.components import Components

TEMPLATES = ["{}", "image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}"]


@torch.no_grad()
def last_token_embeddings(comps: Components, texts: list[str]) -> torch.Tensor:
    """Text-encoder output at the last real token (index ``attention_mask.sum() - 2``; BOS for "")."""
    tokens = comps.tokenize(texts)
    hidden, _ = comps.encode_ids(tokens.input_ids)
    idx = (tokens.attention_mask.sum(dim=1) - 2).clamp(min=0)
    return hidden[torch.arange(len(texts), device=hidden.device), idx].float()


def cross_attention_projections(unet) -> dict[str, torch.nn.Linear]:
    """``attn2.to_k`` and ``attn2.to_v`` layers by their UNet name."""
    out = {n: m for n, m in unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))}
    out = {n: getattr(m, "base_layer", m) for n, m in out.items()}
    if not out:
        raise UserError("UCE: the UNet has no cross-attention (attn2.to_k/to_v) layers")
    return out


def uce_closed_form(
    W_old: torch.Tensor,
    c_erase: torch.Tensor,
    c_guide: torch.Tensor,
    c_preserve: torch.Tensor | None,
    *,
    lamb: float = 0.5,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
) -> torch.Tensor:
    """The UCE edit of one projection ``W_old`` (out x d); ``c_*`` are (n, d) rows (docs/methods.md 8.2)."""
    W = W_old.float()
    d = W.shape[1]
    v_star = c_guide.float() @ W.T  # (n_erase, out): guide outputs under the original weights
    lhs = lamb * W + erase_scale * v_star.T @ c_erase.float()
    rhs = (
        lamb * torch.eye(d, dtype=W.dtype, device=W.device)
        + erase_scale * c_erase.float().T @ c_erase.float()
    )
    if c_preserve is not None and len(c_preserve):
        cp = c_preserve.float()
        lhs = lhs + preserve_scale * (cp @ W.T).T @ cp
        rhs = rhs + preserve_scale * cp.T @ cp
    # W_new = lhs @ rhs^-1, solved as rhs^T W_new^T = lhs^T (rhs is symmetric)
    return torch.linalg.solve(rhs, lhs.T).T


def expand(concepts: list[str], templates: list[str] | None) -> list[str]:
    if not templates:
        return list(concepts)
    return [t.format(c) for c in concepts for t in templates]


@torch.no_grad()
def uce_edit(comps: Components, recipe: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Edited ``attn2.to_k/to_v`` weights (UNet state-dict names) for ``recipe``.

    ``recipe``: ``erase`` (list of concepts), ``guide`` (one string, "" = object type, or a
    list matching ``erase``), ``preserve`` (list), ``lamb``, ``erase_scale``, ``preserve_scale``,
    ``templates`` (optional prompt expansion, applied to erase and preserve alike).
    """
    erase = [str(c) for c in recipe.get("erase") or []]
    if not erase:
        raise UserError("UCE needs at least one concept to erase (checkpoint.erase or the task's list)")
    templates = recipe["templates"] or None
    guide = recipe["guide"]
    guides = [str(g) for g in guide] if isinstance(guide, list | tuple) else [str(guide or "")] * len(erase)
    if len(guides) != len(erase):
        raise UserError(f"UCE: {len(guides)} guide concepts for {len(erase)} erased concepts")
    erase_x = expand(erase, templates)
    guide_x = [g for g in guides for _ in (templates or [None])]
    guide_x = [t.format(g) if g else g for g, t in zip(guide_x, (templates or ["{}"]) * len(guides))]
    preserve_x = expand([str(c) for c in recipe["preserve"] or []], templates)
    c_erase = last_token_embeddings(comps, erase_x)
    c_guide = last_token_embeddings(comps, guide_x)
    c_preserve = last_token_embeddings(comps, preserve_x) if preserve_x else None
    out = {}
    for name, layer in cross_attention_projections(comps.unet).items():
        W_new = uce_closed_form(
            layer.weight.detach(),
            c_erase.to(layer.weight.device),
            c_guide.to(layer.weight.device),
            None if c_preserve is None else c_preserve.to(layer.weight.device),
            lamb=float(recipe["lamb"]),
            erase_scale=float(recipe["erase_scale"]),
            preserve_scale=float(recipe["preserve_scale"]),
        )
        out[f"{name}.weight"] = W_new.to(layer.weight.dtype).cpu()
    return out
