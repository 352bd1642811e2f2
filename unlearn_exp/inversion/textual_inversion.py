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


def token_ids(comps: Components, tokens: list[str]) -> list[int]:
    """Ids of tokens known to the tokenizer as single added tokens; UserError otherwise."""
    vocab = comps.tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        raise UserError(f"token(s) {missing} are not in the tokenizer of model '{comps.name}'")
    return [int(vocab[t]) for t in tokens]


def _check_tokenizes_alone(comps: Components, tokens: list[str]) -> None:
    ids = comps.tokenizer(concept_prompt(tokens), add_special_tokens=False).input_ids
    if ids != token_ids(comps, tokens):
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
    tok = comps.tokenizer
    tokens = placeholder_names(placeholder, num_vectors)
    vocab = tok.get_vocab()
    present = [t for t in tokens if t in vocab]
    if present:
        raise UserError(
            f"placeholder token(s) {present} already exist in the tokenizer vocabulary "
            f"of model '{comps.name}': "
            "choose another placeholder or start from a fresh model"
        )
    init_ids = tok(str(init_word), add_special_tokens=False).input_ids
    if len(init_ids) != 1:
        pieces = tok.convert_ids_to_tokens(init_ids)
        raise UserError(
            f"init word '{init_word}' is {len(init_ids)} CLIP tokens {pieces}, not one: "
            "choose a single-token word (e.g. 'naked', 'violence', 'person')"
        )
    n_added = tok.add_tokens(tokens)
    if n_added != len(tokens):
        raise UserError(f"the tokenizer accepted {n_added} of the placeholder tokens {tokens}")
    _check_tokenizes_alone(comps, tokens)
    ids = token_ids(comps, tokens)
    _resize(comps, max(ids) + 1)
    weight = comps.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[ids] = weight[init_ids[0]].clone()
    log.info("added placeholder tokens %s (ids %s) initialised from '%s'", tokens, ids, init_word)
    return tokens


def _resize(comps: Components, n_rows: int) -> None:
    """Grow the text encoder's token table to ``n_rows`` (old rows copied unchanged, no resampling)."""
    emb = comps.text_encoder.get_input_embeddings()
    if isinstance(emb, LearnedRowsEmbedding):
        raise UserError("cannot add tokens while a concept inversion is in progress on this text encoder")
    if emb.weight.shape[0] < n_rows:
        # mean_resizing=False: new rows are overwritten at once; it would also draw from the global RNG
        comps.text_encoder.resize_token_embeddings(n_rows, mean_resizing=False)


# ----------------------------------------------------------------------------- learned rows
class LearnedRowsEmbedding(torch.nn.Module):
    """The frozen token table with the rows of ``ids`` replaced by the trainable ``learned`` (K, D)."""

    def __init__(self, base: torch.nn.Embedding, ids: list[int]):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long, device=base.weight.device))
        self.learned = torch.nn.Parameter(base.weight.detach()[ids].clone().float())

    @property
    def weight(self) -> torch.Tensor:
        """The frozen table (read by code asking the embedding's device, dtype or width)."""
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        match = input_ids.unsqueeze(-1) == self.ids  # (..., K)
        hit = match.any(-1, keepdim=True)
        rows = self.learned.to(out.dtype)[match.long().argmax(-1)]
        return torch.where(hit, rows, out)


def install_learned_rows(comps: Components, tokens: list[str]) -> LearnedRowsEmbedding:
    """Swap in a ``LearnedRowsEmbedding`` for ``tokens``; the rest of the text encoder is frozen."""
    current = comps.text_encoder.get_input_embeddings()
    if isinstance(current, LearnedRowsEmbedding):
        raise UserError("a concept inversion is already installed on this text encoder")
    wrapper = LearnedRowsEmbedding(current, token_ids(comps, tokens))
    comps.text_encoder.set_input_embeddings(wrapper)
    return wrapper


def merge_learned_rows(comps: Components, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Write the learned rows (or ``rows``) into the plain table and put the plain table back."""
    wrapper = comps.text_encoder.get_input_embeddings()
    if not isinstance(wrapper, LearnedRowsEmbedding):
        raise UserError("no concept inversion is installed on this text encoder")
    rows = (wrapper.learned if rows is None else rows).detach()
    with torch.no_grad():
        wrapper.base.weight[wrapper.ids] = rows.to(wrapper.base.weight)
    comps.text_encoder.set_input_embeddings(wrapper.base)
    return rows.float().cpu().clone()


# ----------------------------------------------------------------------------- the file
def save_textual_inversion(
    path: str | Path, tokens: list[str], rows: torch.Tensor, metadata: dict[str, Any] | None = None
) -> Path:
    """Write diffusers' textual-inversion file: ``{tokens[0]: rows (K, D)}``, atomically.

    ``metadata`` goes, as JSON, into the safetensors header (diffusers ignores it).
    """
    tokens = list(tokens)
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


def read_textual_inversion(path: str | Path) -> tuple[list[str], torch.Tensor, dict[str, Any]]:
    """``(tokens, rows (K, D) float32, metadata)`` of a textual-inversion safetensors file."""
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
    try:
        meta = json.loads(header.get(METADATA_KEY, "{}"))
    except json.JSONDecodeError:
        meta = {}
    return placeholder_names(name, rows.shape[0]), rows, meta


def load_concept_tokens(comps: Components, path: str | Path) -> list[str]:
    """Add the file's tokens and rows to ``comps`` (tokenizer + text encoder); returns the token strings.

    Idempotent: when the tokens were already added (an earlier call, or ``invert`` on these
    components) their rows are overwritten with the file's. Tokens of the base vocabulary are
    never overwritten.
    """
    tokens, rows, _ = read_textual_inversion(path)
    width = comps.text_encoder.get_input_embeddings().weight.shape[-1]
    if rows.shape[-1] != width:
        raise UserError(
            f"textual-inversion file {path} has embedding width {rows.shape[-1]} but model "
            f"'{comps.name}' has width {width}: it was learned on another text encoder"
        )
    tok = comps.tokenizer
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
        _check_tokenizes_alone(comps, tokens)
    ids = token_ids(comps, tokens)
    _resize(comps, max(ids) + 1)
    weight = comps.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[ids] = rows.to(weight)
    log.info("loaded concept tokens %s from %s", tokens, path)
    return tokens
