"""Placeholder tokens, the learned-rows embedding, and the textual-inversion file (docs/methods.md 6.1, 6.3).

A concept ``C*`` is K new tokens ``<c*>, <c*>_1, ..., <c*>_{K-1}`` (the names diffusers'
``load_textual_inversion`` gives a K-vector embedding), whose input-embedding rows are the only
trained tensor. During training the text encoder's token embedding is replaced, through the public
``set_input_embeddings``, by ``LearnedRowsEmbedding``: the frozen table with the placeholder rows
swapped for a trainable ``(K, D)`` parameter. ``merge_learned_rows`` writes the rows back into the
plain table, so every other row stays bit-identical (equivalent to docs/methods.md 6.2's per-step
restore of ``index_no_updates``).

The file is diffusers' format: one safetensors tensor named after the first token, shape ``(K, D)``.
diffusers expands the prompt ``"<c*>"`` to ``"<c*> <c*>_1 ... <c*>_{K-1}"`` (``maybe_convert_prompt``);
this project's sampler does not, so prompts here use ``concept_prompt(tokens)``, the same expansion.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from unlearn_exp.atomic import atomic_file
from unlearn_exp.errors import UserError
from unlearn_exp.models.components import Components

log = logging.getLogger(__name__)

METADATA_KEY = "unlearn_exp"


def placeholder_names(placeholder: str, num_vectors: int) -> list[str]:
    """``[p, p_1, ..., p_{K-1}]``: diffusers' names for the vectors of a K-vector embedding."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def concept_prompt(tokens: list[str], template: str = "{}") -> str:
    """The prompt naming the concept: all K tokens in order, as diffusers' ``maybe_convert_prompt``
    writes them."""
    return template.format(" ".join(tokens))


def token_ids(comps: Components, tokens: list[str], tokenizer=None) -> list[int]:
    """Ids of tokens known to the tokenizer (the model's first, or ``tokenizer``) as single added
    tokens; UserError otherwise."""
    vocab = (tokenizer or comps.tokenizer).get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        raise UserError(f"token(s) {missing} are not in the tokenizer of model '{comps.name}'")
    return [int(vocab[t]) for t in tokens]


WORD_MARKER = "\u2581"  # SentencePiece's word start: T5 writes one before an added token


def _check_tokenizes_alone(comps: Components, tokens: list[str], tokenizer=None) -> None:
    tokenizer = tokenizer or comps.tokenizer
    ids = tokenizer(concept_prompt(tokens), add_special_tokens=False).input_ids
    ids = [i for i in ids if tokenizer.convert_ids_to_tokens(i) != WORD_MARKER]  # T5's bare word starts
    if ids != token_ids(comps, tokens, tokenizer):
        raise UserError(
            f"placeholder tokens {tokens} do not tokenize as {len(tokens)} single tokens (got ids {ids}): "
            "choose a lower-case placeholder such as '<c*>'"
        )


def add_placeholder_tokens(
    comps: Components, placeholder: str = "<c*>", num_vectors: int = 1, init_word: str = "naked"
) -> list[str]:
    """Add K placeholder tokens, each row initialised from ``init_word``'s row (docs/methods.md 6.3).

    The default initialiser is "naked", not the paper's "nudity": in the CLIP BPE vocabulary
    "nudity" is two tokens ('nu', 'dity</w>'), which textual inversion cannot start from.
    """
    if not isinstance(num_vectors, int) or num_vectors < 1:
        raise UserError(f"inversion.num_vectors must be a positive integer, got {num_vectors!r}")
    if not placeholder or placeholder != placeholder.strip() or " " in placeholder:
        raise UserError(f"placeholder must be a non-empty string without spaces, got {placeholder!r}")
    if not init_word or not str(init_word).strip():
        raise UserError("inversion.init_word is empty: give one existing single-token word, e.g. 'naked'")
    tokens = placeholder_names(placeholder, num_vectors)
    slots = comps.text_encoder_slots()
    for _, tok, _ in slots:
        present = [t for t in tokens if t in tok.get_vocab()]
        if present:
            raise UserError(
                f"placeholder token(s) {present} already exist in the tokenizer vocabulary "
                f"of model '{comps.name}': "
                "choose another placeholder or start from a fresh model"
            )
    init = []
    for key, tok, _ in slots:
        init_ids = tok(str(init_word), add_special_tokens=False).input_ids
        if len(init_ids) != 1:
            pieces = tok.convert_ids_to_tokens(init_ids)
            raise UserError(
                f"init word '{init_word}' is {len(init_ids)} {key or 'CLIP'} tokens {pieces}, not one: "
                "choose a single-token word (e.g. 'naked', 'violence', 'person')"
            )
        init.append(init_ids[0])
    for (_, tok, encoder), init_id in zip(slots, init):
        n_added = tok.add_tokens(tokens)
        if n_added != len(tokens):
            raise UserError(f"the tokenizer accepted {n_added} of the placeholder tokens {tokens}")
        _check_tokenizes_alone(comps, tokens, tok)
        ids = token_ids(comps, tokens, tok)
        _resize(encoder, max(ids) + 1)
        weight = encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight[ids] = weight[init_id].clone()
        log.info("added placeholder tokens %s (ids %s) initialised from '%s'", tokens, ids, init_word)
    return tokens


def _resize(encoder, n_rows: int) -> None:
    """Grow a text encoder's token table to ``n_rows`` (old rows copied unchanged, no resampling)."""
    emb = encoder.get_input_embeddings()
    if isinstance(emb, LearnedRowsEmbedding):
        raise UserError("cannot add tokens while a concept inversion is in progress on this text encoder")
    if emb.weight.shape[0] < n_rows:
        # mean_resizing=False: new rows are overwritten at once; it would also draw from the global RNG
        encoder.resize_token_embeddings(n_rows, mean_resizing=False)


# ----------------------------------------------------------------------------- learned rows
class LearnedRowsEmbedding(torch.nn.Module):
    """The frozen token table with the rows of ``ids`` replaced by the trainable ``learned`` (K, D).

    With several text encoders (SD3) one ``learned`` parameter ``(K, sum of widths)`` holds every
    encoder's rows side by side; each encoder's table reads its columns through a
    ``ColumnsEmbedding``, and this module (installed on the first encoder) owns the parameter."""

    def __init__(self, base: torch.nn.Embedding, ids: list[int], learned: torch.Tensor | None = None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long, device=base.weight.device))
        rows = base.weight.detach()[ids].clone().float() if learned is None else learned
        self.learned = torch.nn.Parameter(rows)
        self.width = int(base.weight.shape[-1])

    @property
    def weight(self) -> torch.Tensor:
        """The frozen table (read by code asking the embedding's device, dtype or width)."""
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return with_learned_rows(self.base, self.ids, self.learned[:, : self.width], input_ids)


def with_learned_rows(base, ids: torch.Tensor, rows: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """``base``'s embedding of ``input_ids`` with the positions holding ``ids`` (K) read from ``rows``
    (K, D) instead."""
    out = base(input_ids)
    match = input_ids.unsqueeze(-1) == ids  # (..., K)
    hit = match.any(-1, keepdim=True)
    return torch.where(hit, rows.to(out.dtype)[match.long().argmax(-1)], out)


class ColumnsEmbedding(torch.nn.Module):
    """Another text encoder's table with its rows read from columns ``[start, stop)`` of the owner's
    ``learned`` parameter (the owner is not registered here: it is trained and saved once)."""

    def __init__(self, base: torch.nn.Embedding, ids: list[int], owner: LearnedRowsEmbedding, start: int):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long, device=base.weight.device))
        self._owner = [owner]  # a list: not a submodule
        self.start, self.stop = start, start + int(base.weight.shape[-1])

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self._owner[0].learned[:, self.start : self.stop]
        return with_learned_rows(self.base, self.ids.to(input_ids.device), rows, input_ids)


def install_learned_rows(comps: Components, tokens: list[str]) -> LearnedRowsEmbedding:
    """Swap in the learned-rows tables for ``tokens`` on every text encoder (the first owns the
    trainable rows, ``(K, D)``, or ``(K, sum of widths)`` with several encoders); the rest frozen."""
    slots = comps.text_encoder_slots()
    if any(
        isinstance(enc.get_input_embeddings(), LearnedRowsEmbedding | ColumnsEmbedding) for _, _, enc in slots
    ):
        raise UserError("a concept inversion is already installed on this text encoder")
    bases = [enc.get_input_embeddings() for _, _, enc in slots]
    ids = [token_ids(comps, tokens, tok) for _, tok, _ in slots]
    rows = torch.cat([b.weight.detach()[i].clone().float() for b, i in zip(bases, ids)], dim=-1)
    owner = LearnedRowsEmbedding(bases[0], ids[0], rows if len(slots) > 1 else None)
    slots[0][2].set_input_embeddings(owner)
    start = owner.width
    for (_, _, enc), base, i in zip(slots[1:], bases[1:], ids[1:]):
        enc.set_input_embeddings(ColumnsEmbedding(base, i, owner, start))
        start += int(base.weight.shape[-1])
    return owner


def split_rows(comps: Components, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The learned rows ``(K, sum of widths)`` per text encoder, by its file key."""
    out, start = {}, 0
    for key, _, enc in comps.text_encoder_slots():
        width = int(enc.get_input_embeddings().weight.shape[-1])
        out[key] = rows[:, start : start + width]
        start += width
    return out


def merge_learned_rows(comps: Components, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Write the learned rows (or ``rows``) into the plain tables and put the plain tables back."""
    slots = comps.text_encoder_slots()
    owner = slots[0][2].get_input_embeddings()
    if not isinstance(owner, LearnedRowsEmbedding):
        raise UserError("no concept inversion is installed on this text encoder")
    rows = (owner.learned if rows is None else rows).detach()
    for (_, _, enc), part in zip(slots, split_rows(comps, rows).values()):
        wrapper = enc.get_input_embeddings()
        with torch.no_grad():
            wrapper.base.weight[wrapper.ids] = part.to(wrapper.base.weight)
        enc.set_input_embeddings(wrapper.base)
    return rows.float().cpu().clone()


# ----------------------------------------------------------------------------- the file
SLOT_KEYS = ("clip_l", "clip_g", "t5")  # the multi-encoder file's keys (SDXL's convention, and T5)


def save_textual_inversion(
    path: str | Path,
    tokens: list[str],
    rows: torch.Tensor | dict[str, torch.Tensor],
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write diffusers' textual-inversion file, atomically: ``{tokens[0]: rows (K, D)}`` for one text
    encoder; for several (SD3) ``rows`` is a dict ``{"clip_l": (K, 768), "clip_g": (K, 1280),
    "t5": (K, 4096)}`` written under those keys, as SDXL's textual-inversion files (diffusers loads each
    with ``load_textual_inversion(state["clip_l"], token=..., text_encoder=..., tokenizer=...)``).

    ``metadata`` goes, as JSON, into the safetensors header (diffusers ignores it); it names the tokens.
    """
    tokens = list(tokens)
    if isinstance(rows, dict):
        return _save_slots(Path(path), tokens, rows, metadata)
    rows = torch.as_tensor(rows).detach().float().cpu()
    if rows.ndim == 1:
        rows = rows[None]
    if rows.ndim != 2 or rows.shape[0] != len(tokens):
        raise UserError(f"{len(tokens)} tokens but embedding rows of shape {tuple(rows.shape)}")
    if tokens != placeholder_names(tokens[0], len(tokens)):
        raise UserError(
            f"tokens {tokens} do not follow diffusers' multi-vector names "
            f"{placeholder_names(tokens[0], len(tokens))}: the file would load under other names"
        )
    if not torch.isfinite(rows).all():
        raise UserError(f"refusing to save non-finite embedding rows for {tokens}")
    # one header entry: safetensors writes its metadata from a hash map, so two entries came out in
    # either order from one process to the next and the same embedding was different bytes
    header = {METADATA_KEY: json.dumps({**(metadata or {}), "tokens": tokens}, sort_keys=True, default=str)}
    path = Path(path)
    with atomic_file(path) as tmp:
        save_file({tokens[0]: rows.contiguous()}, str(tmp), metadata=header)
    return path


def _save_slots(path: Path, tokens: list[str], rows: dict[str, torch.Tensor], metadata) -> Path:
    if not rows or set(rows) - set(SLOT_KEYS):
        raise UserError(f"textual-inversion rows must be keyed by {SLOT_KEYS}, got {sorted(rows)}")
    if tokens != placeholder_names(tokens[0], len(tokens)):
        raise UserError(f"tokens {tokens} do not follow diffusers' multi-vector names")
    state = {}
    for key, r in rows.items():
        r = torch.as_tensor(r).detach().float().cpu()
        if r.ndim != 2 or r.shape[0] != len(tokens):
            raise UserError(f"{len(tokens)} tokens but '{key}' rows of shape {tuple(r.shape)}")
        if not torch.isfinite(r).all():
            raise UserError(f"refusing to save non-finite embedding rows for {tokens}")
        state[key] = r.contiguous()
    header = {METADATA_KEY: json.dumps({**(metadata or {}), "tokens": tokens}, sort_keys=True, default=str)}
    with atomic_file(path) as tmp:
        save_file(state, str(tmp), metadata=header)
    return path


def read_textual_inversion(
    path: str | Path,
) -> tuple[list[str], torch.Tensor | dict[str, torch.Tensor], dict[str, Any]]:
    """``(tokens, rows, metadata)`` of a textual-inversion safetensors file: rows ``(K, D)`` float32
    for a one-encoder file, a dict by encoder key for a multi-encoder one (``SLOT_KEYS``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"textual-inversion file not found: {path}")
    try:
        state = load_file(str(path), device="cpu")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"cannot read textual-inversion file {path}: {exc}") from None
    try:
        meta = json.loads(header.get(METADATA_KEY, "{}"))
    except json.JSONDecodeError:
        meta = {}
    if state and set(state) <= set(SLOT_KEYS):
        return _read_slots(path, state, meta)
    if len(state) != 1:
        raise UserError(
            f"textual-inversion file {path} holds {len(state)} tensors {sorted(state)[:5]}; expected one"
        )
    name, rows = next(iter(state.items()))
    rows = rows.float()
    if rows.ndim == 1:
        rows = rows[None]
    if rows.ndim != 2 or rows.shape[0] < 1:
        raise UserError(f"textual-inversion file {path}: tensor '{name}' has shape {tuple(rows.shape)}")
    return placeholder_names(name, rows.shape[0]), rows, meta


def _read_slots(path: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]):
    rows = {k: (v.float()[None] if v.ndim == 1 else v.float()) for k, v in state.items()}
    counts = {k: r.shape[0] for k, r in rows.items()}
    if len(set(counts.values())) != 1 or any(r.ndim != 2 for r in rows.values()):
        raise UserError(f"textual-inversion file {path}: its encoders' rows differ in shape {counts}")
    k = next(iter(counts.values()))
    tokens = list(meta.get("tokens") or placeholder_names("<c*>", k))
    if len(tokens) != k:
        raise UserError(f"textual-inversion file {path}: {len(tokens)} tokens named for {k} rows")
    return tokens, {key: rows[key] for key in SLOT_KEYS if key in rows}, meta


def load_concept_tokens(comps: Components, path: str | Path) -> list[str]:
    """Add the file's tokens and rows to ``comps`` (each tokenizer and text encoder); returns the
    token strings.

    Idempotent: when the tokens were already added (an earlier call, or ``invert`` on these
    components) their rows are overwritten with the file's. Tokens of the base vocabulary are
    never overwritten. A one-encoder file fits a one-encoder model, a multi-encoder file the
    encoders it names (all of the model's: a file without T5's rows does not fit a model with T5).
    """
    tokens, rows, _ = read_textual_inversion(path)
    slots = comps.text_encoder_slots()
    if isinstance(rows, dict):
        keys = [key for key, _, _ in slots]
        if sorted(rows) != sorted(keys):
            raise UserError(
                f"textual-inversion file {path} holds rows for {sorted(rows)} but model '{comps.name}' "
                f"has the text encoders {keys}: it was learned on another model"
            )
        parts = [rows[key] for key in keys]
    else:
        if len(slots) != 1:
            raise UserError(
                f"textual-inversion file {path} holds one encoder's rows but model '{comps.name}' has "
                f"{len(slots)} text encoders: it was learned on another model"
            )
        parts = [rows]
    for (_, tok, enc), part in zip(slots, parts):
        _load_slot(comps, path, tokens, tok, enc, part)
    log.info("loaded concept tokens %s from %s", tokens, path)
    return tokens


def _load_slot(comps: Components, path, tokens: list[str], tok, encoder, rows: torch.Tensor) -> None:
    width = encoder.get_input_embeddings().weight.shape[-1]
    if rows.shape[-1] != width:
        raise UserError(
            f"textual-inversion file {path} has embedding width {rows.shape[-1]} but model "
            f"'{comps.name}' has width {width}: it was learned on another text encoder"
        )
    vocab = tok.get_vocab()
    added = set(tok.added_tokens_encoder) - set(tok.all_special_tokens)
    clash = [t for t in tokens if t in vocab and t not in added]
    if clash:
        raise UserError(
            f"tokens {clash} of {path} are words of the base vocabulary; refusing to overwrite them"
        )
    new = [t for t in tokens if t not in vocab]
    if new and len(new) != len(tokens):
        raise UserError(f"only some of the tokens {tokens} of {path} exist in model '{comps.name}'")
    if new:
        tok.add_tokens(tokens)
        _check_tokenizes_alone(comps, tokens, tok)
    ids = token_ids(comps, tokens, tok)
    _resize(encoder, max(ids) + 1)
    weight = encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[ids] = rows.to(weight)
