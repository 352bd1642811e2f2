"""Placeholder tokens and the textual-inversion file (docs/methods.md 6.1, 6.3)."""

import pytest
import torch

from unlearn_exp.errors import UserError
from unlearn_exp.inversion.textual_inversion import (
    add_placeholder_tokens,
    concept_prompt,
    install_learned_rows,
    load_concept_tokens,
    merge_learned_rows,
    read_textual_inversion,
    save_textual_inversion,
    token_ids,
)
from unlearn_exp.models import build_tiny


@pytest.fixture
def comps():
    return build_tiny(resolution=16)


def test_placeholder_rows_start_from_the_init_word(comps):
    before = comps.text_encoder.get_input_embeddings().weight.clone()
    tokens = add_placeholder_tokens(comps, "<c*>", 3, "dog")
    assert tokens == ["<c*>", "<c*>_1", "<c*>_2"]
    ids = token_ids(comps, tokens)
    assert comps.tokenizer(concept_prompt(tokens), add_special_tokens=False).input_ids == ids
    weight = comps.text_encoder.get_input_embeddings().weight
    dog = comps.tokenizer("dog", add_special_tokens=False).input_ids[0]
    assert torch.equal(weight[: before.shape[0]], before)
    for i in ids:
        assert torch.equal(weight[i], before[dog])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"init_word": "nudity"}, "2 CLIP tokens"),
        ({"init_word": "  "}, "empty"),
        ({"placeholder": "dog"}, "already exist"),
        ({"num_vectors": 0}, "positive integer"),
    ],
)
@pytest.mark.slow
def test_bad_placeholder_requests_are_user_errors(comps, kwargs, message):
    args = {"placeholder": "<c*>", "num_vectors": 1, "init_word": "dog", **kwargs}
    with pytest.raises(UserError, match=message):
        add_placeholder_tokens(comps, **args)


def test_existing_placeholder_is_refused(comps):
    add_placeholder_tokens(comps, "<c*>", 1, "dog")
    with pytest.raises(UserError, match="already exist"):
        add_placeholder_tokens(comps, "<c*>", 1, "dog")


def test_learned_rows_wrapper_trains_only_its_rows(comps):
    tokens = add_placeholder_tokens(comps, "<c*>", 2, "cat")
    before = comps.text_encoder.get_input_embeddings().weight.clone()
    wrapper = install_learned_rows(comps, tokens)
    hidden, _ = comps.encode_prompts(["a photo of " + concept_prompt(tokens)])
    hidden.square().mean().backward()
    assert wrapper.learned.grad is not None and wrapper.learned.grad.abs().sum() > 0
    assert wrapper.base.weight.grad is None
    with torch.no_grad():
        wrapper.learned.add_(1.0)
    rows = merge_learned_rows(comps)
    table = comps.text_encoder.get_input_embeddings()
    assert isinstance(table, torch.nn.Embedding)
    ids = token_ids(comps, tokens)
    others = torch.ones(table.weight.shape[0], dtype=torch.bool)
    others[ids] = False
    assert torch.equal(table.weight[others], before[others])
    assert torch.equal(table.weight[ids], rows)


@pytest.mark.parametrize("k", [1, 3])
def test_file_loads_in_diffusers_and_here_with_the_same_rows(comps, tmp_path, k):
    tokens = add_placeholder_tokens(comps, "<c*>", k, "dog")
    rows = torch.randn(k, comps.text_dim, generator=torch.Generator().manual_seed(k))
    path = save_textual_inversion(tmp_path / "learned_embeds.safetensors", tokens, rows, {"steps": 7})
    assert read_textual_inversion(path)[2]["steps"] == 7

    pipe = build_tiny(resolution=16).to_diffusers()
    pipe.load_textual_inversion(str(path))
    ids = pipe.tokenizer.convert_tokens_to_ids(tokens)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], rows)
    # diffusers expands "<c*>" to the K token names: the same prompt as concept_prompt
    assert pipe.maybe_convert_prompt("<c*>", pipe.tokenizer) == concept_prompt(tokens)

    fresh = build_tiny(resolution=16)
    assert load_concept_tokens(fresh, path) == tokens
    assert load_concept_tokens(fresh, path) == tokens  # idempotent
    weight = fresh.text_encoder.get_input_embeddings().weight
    assert weight.shape[0] == 49408 + k
    assert torch.equal(weight[token_ids(fresh, tokens)], rows)
    ours, _ = fresh.encode_prompts(["<c*>"] if k == 1 else [concept_prompt(tokens)])
    theirs = pipe.encode_prompt("<c*>", "cpu", 1, False)[0]  # diffusers expands "<c*>" itself
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_load_rejects_width_mismatch_and_broken_files(comps, tmp_path):
    path = save_textual_inversion(tmp_path / "wide.safetensors", ["<c*>"], torch.zeros(1, 48))
    with pytest.raises(UserError, match="width 48 .* width 32"):
        load_concept_tokens(comps, path)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot read"):
        load_concept_tokens(comps, broken)
    with pytest.raises(UserError, match="not found"):
        load_concept_tokens(comps, tmp_path / "missing.safetensors")
    clash = save_textual_inversion(tmp_path / "dog.safetensors", ["dog"], torch.zeros(1, 32))
    with pytest.raises(UserError, match="base vocabulary"):
        load_concept_tokens(comps, clash)
    assert len(comps.tokenizer) == 49408


def test_save_refuses_names_diffusers_would_not_use(tmp_path):
    with pytest.raises(UserError, match="multi-vector names"):
        save_textual_inversion(tmp_path / "x.safetensors", ["<a>", "<b>"], torch.zeros(2, 4))
    with pytest.raises(UserError, match="non-finite"):
        save_textual_inversion(tmp_path / "x.safetensors", ["<a>"], torch.full((1, 4), float("nan")))
    assert not list(tmp_path.iterdir())
