"""UCE: Unified Concept Editing, the closed-form edit of the maps that read the text (docs/methods.md 8.2).

For every linear map ``W_old`` that reads the text encoders' output (SD v1: the cross-attention
projections ``attn2.to_k``, ``attn2.to_v``; SD3: ``TEXT_READERS``)::

    W_new = ( lamb W_old + s_e sum_i v*_i c_i^T + s_p sum_j (W_old c_j) c_j^T )
            ( lamb I     + s_e sum_i c_i c_i^T  + s_p sum_j c_j c_j^T )^{-1}

with ``c`` the text features a map reads at the last real token of a concept string (or the pooled
vector, for a map that reads it) and ``v*_i = W_old c_guide(i)`` the guide concept's output under the
original weights. Computed in fp32.
"""

from __future__ import annotations

from typing import Any

import torch

from unlearn_exp.errors import UserError
from unlearn_exp.models.components import FamilyComponents

# The linear maps that read the text features, by family: (module name or suffix, what it reads).
# SD v1: every cross-attention key and value projection reads the text encoder's sequence. SD3 (no
# official UCE code; as the official FLUX script, trainscripts/uce_flux_edit.py, docs/methods.md 8.2):
# the transformer's two timestep-free maps of the text, context_embedder (the joint CLIP/T5 sequence)
# and the pooled vector's first projection.
TEXT_READERS: dict[str, tuple[tuple[str, str], ...]] = {
    "sd1": (("attn2.to_k", "sequence"), ("attn2.to_v", "sequence")),
    "sd3": (("context_embedder", "sequence"), ("time_text_embed.text_embedder.linear_1", "pooled")),
}

TEMPLATES = ["{}", "image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}"]


@torch.no_grad()
def concept_features(comps: FamilyComponents, texts: list[str]) -> dict[str, torch.Tensor]:
    """What the text-reading maps see of each concept string, in fp32.

    ``sequence``: the conditioning sequence at the last real token (index ``attention_mask.sum() - 2``;
    BOS for ""), one row per string; with SD3's T5, a second block of rows at T5's last real token
    (the same index in T5's part of the joint sequence; for "", -2 + 1 wraps to T5's last position,
    as in the official FLUX script). ``pooled``: the pooled vector (SD3), one row per string.
    """
    tokens = comps.tokenize(texts)
    cond = comps.condition(tokens)
    seq = cond.sequence
    rows = torch.arange(len(texts), device=seq.device)
    idx = (tokens.attention_mask.sum(dim=1) - 2).clamp(min=0).to(seq.device)
    parts = [seq[rows, idx]]
    t5 = tokens.more.get("t5")
    if t5 is not None:  # SD3: T5's tokens follow CLIP's 77 in the joint sequence
        n_t5 = (t5 != comps.tokenizer_3.pad_token_id).sum(dim=1).to(seq.device)
        parts.append(seq[rows, tokens.input_ids.shape[1] + (n_t5 - 2) % t5.shape[1]])
    out = {"sequence": torch.cat(parts).float()}
    if cond.pooled is not None:
        out["pooled"] = cond.pooled.float()
    return out


def last_token_embeddings(comps: FamilyComponents, texts: list[str]) -> torch.Tensor:
    """The ``sequence`` rows of ``concept_features``: the text at each string's last real token."""
    return concept_features(comps, texts)["sequence"]


def is_text_reader_weight(key: str, family: str) -> bool:
    """Whether a state-dict key (diffusers names, ``unet.``/``transformer.`` prefix allowed) is the
    weight of a map UCE edits on ``family``."""
    name = key.removeprefix("unet.").removeprefix("transformer.").removesuffix(".weight")
    return key.endswith(".weight") and any(
        name == suffix or name.endswith("." + suffix) for suffix, _ in TEXT_READERS[family]
    )


def text_reading_layers(denoiser, family: str = "sd1") -> dict[str, tuple[torch.nn.Linear, str]]:
    """The linear maps UCE edits (``TEXT_READERS``), by their name in ``denoiser``, with what each reads."""
    readers = TEXT_READERS[family]
    out = {}
    for n, m in denoiser.named_modules():
        for suffix, reads in readers:
            if n == suffix or n.endswith("." + suffix):
                out[n] = (getattr(m, "base_layer", m), reads)
    if not out:
        names = "/".join(suffix for suffix, _ in readers)
        raise UserError(f"UCE: the {family} denoiser has none of the layers UCE edits ({names})")
    return out


def cross_attention_projections(unet) -> dict[str, torch.nn.Linear]:
    """SD v1's ``attn2.to_k`` and ``attn2.to_v`` layers by their UNet name."""
    return {n: layer for n, (layer, _) in text_reading_layers(unet, "sd1").items()}


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
def uce_edit(comps: FamilyComponents, recipe: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Edited weights of the text-reading maps (the denoiser's state-dict names) for ``recipe``.

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
    c_erase = concept_features(comps, erase_x)
    c_guide = concept_features(comps, guide_x)
    c_preserve = concept_features(comps, preserve_x) if preserve_x else None
    out = {}
    for name, (layer, reads) in text_reading_layers(comps.denoiser, comps.family).items():
        device = layer.weight.device
        W_new = uce_closed_form(
            layer.weight.detach(),
            c_erase[reads].to(device),
            c_guide[reads].to(device),
            None if c_preserve is None else c_preserve[reads].to(device),
            lamb=float(recipe["lamb"]),
            erase_scale=float(recipe["erase_scale"]),
            preserve_scale=float(recipe["preserve_scale"]),
        )
        out[f"{name}.weight"] = W_new.to(layer.weight.dtype).cpu()
    return out
