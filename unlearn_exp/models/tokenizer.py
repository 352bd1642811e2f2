"""An offline CLIP tokenizer built from the BPE vocabulary that open_clip ships.

Stable Diffusion v1.4 uses OpenAI CLIP's BPE: 49,408 ids, BOS 49406, EOS 49407 (also the pad id),
77 positions. open_clip carries the same merges file, so the tokenizer can be built without any
download; its ids match ``open_clip.tokenize`` up to the EOS token (open_clip pads with 0, Stable
Diffusion with EOS).
"""

from __future__ import annotations

import gzip
import string
from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTokenizer, T5TokenizerFast

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


# A T5 tokenizer for the tiny SD3 model, generated here (no download): a Unigram model over lower-case
# letters, digits, punctuation and a few dozen whole words, SentencePiece's "▁" word marker, and T5's
# special ids (pad 0, end of sequence 1, unknown 2). Stable Diffusion 3's real T5 tokenizer has 32,100
# pieces; this one has what a unit test needs: the same classes, padding, truncation and end token.
T5_WORDS = (
    "a an the of on in at with and or photo image picture painting person people woman man girl boy nude "
    "naked body blood gun fight red green blue yellow circle square triangle cat dog church truck"
).split()


def build_t5_tokenizer(model_max_length: int = 256):
    """A fresh ``T5TokenizerFast`` built in memory (see above)."""
    chars = list(string.ascii_lowercase + string.digits + ".,!?'-:;()")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -5.0) for c in chars] + [("\u2581" + c, -4.0) for c in chars]
    pieces += [("\u2581" + w, -3.0) for w in T5_WORDS]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=model_max_length,
    )
