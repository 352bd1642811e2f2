"""An offline CLIP tokenizer built from the BPE vocabulary that open_clip ships.

Stable Diffusion v1.4 uses OpenAI CLIP's BPE: 49,408 ids, BOS 49406, EOS 49407 (also the pad id),
77 positions. open_clip carries the same merges file, so the tokenizer can be built without any
download; its ids match ``open_clip.tokenize`` up to the EOS token (open_clip pads with 0, Stable
Diffusion with EOS).
"""

from __future__ import annotations

import gzip
from functools import lru_cache

from transformers import CLIPTokenizer

MAX_LENGTH = 77
BOS_ID = 49406
EOS_ID = 49407


@lru_cache(maxsize=1)
def vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from open_clip import tokenizer as oc_tok

    lines = gzip.open(oc_tok.default_bpe()).read().decode("utf-8").split("\n")
    # CLIP keeps the first 49152 - 256 - 2 merges (after the header line).
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_symbols = list(oc_tok.bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def build_clip_tokenizer(model_max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """Return a fresh ``CLIPTokenizer`` (a new object each call: callers may add tokens to it)."""
    vocab, merges = vocab_and_merges()
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)
    assert tok.bos_token_id == BOS_ID and tok.eos_token_id == EOS_ID
    return tok
