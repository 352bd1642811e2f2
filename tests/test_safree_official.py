"""SAFREE ``compat=official`` against a re-statement of the official code's functions on the tiny model:
the flags, the projected embeddings, the step counts and the images; and where ``fixed`` differs."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import compose
from unlearn_exp.config import typed_preset
from unlearn_exp.guidance import SAFREE, Concept, make_guidance
from unlearn_exp.guidance.base import Guidance
from unlearn_exp.guidance.config import SAFREEConfig
from unlearn_exp.sampling import sample

KEYWORDS = ["nudity", "sexual acts", "naked"]
SHORT = "a naked woman lying on a sofa in a room"
LONG = "a naked woman " + " ".join(["standing in a bright room with tall windows and plants"] * 9)
ONE = "naked"  # one CLIP token


# ---- the official functions, re-stated (jaehong31/SAFREE, models/modified_stable_diffusion_pipeline.py)
def projection_matrix(e):
    return e @ torch.pinverse(e.T @ e) @ e.T


def official_masked_encode_prompt(comps, prompt):
    ids = comps.tokenizer(prompt, padding="longest", return_tensors="pt").input_ids
    n_real = ids.shape[1] - 2
    if ids.shape[1] > comps.tokenizer.model_max_length:
        ids = ids[:, : comps.tokenizer.model_max_length]
        n_real = comps.tokenizer.model_max_length - 2
    masked = ids.repeat(n_real, 1)
    for i in range(n_real):
        masked[i, i + 1] = 0
    hidden = comps.text_encoder(masked).last_hidden_state
    return hidden[torch.arange(hidden.shape[0]), masked.to(torch.int).argmax(dim=-1)]  # legacy pooling


def official_safree_projection(text_e, p_emb, ms, cs, alpha, max_length=77):
    n_t, dim = p_emb.shape
    i_m_cs = torch.eye(dim) - cs
    dist = torch.norm(i_m_cs @ p_emb.T, dim=0)
    means = [torch.mean(torch.cat((dist[:i], dist[i + 1 :]))) for i in range(n_t)]
    rm_vector = (dist < (1.0 + alpha) * torch.tensor(means)).float()
    ones = torch.ones(max_length)
    ones[1 : n_t + 1] = rm_vector
    new_text_e = (i_m_cs @ ms @ text_e.T).T
    return torch.where(ones.unsqueeze(1).bool(), text_e, new_text_e), rm_vector


def official_svf_steps(text_e, ms, cs, attention_mask, up_t=10):
    proj = ((torch.eye(ms.shape[0]) - cs) @ ms @ text_e.T).T
    active = attention_mask == 1
    beta = 1 - torch.nn.functional.cosine_similarity(proj[active], text_e[active]).mean().item()
    return round(up_t * (1 / (1 + math.exp(-2.0 * 2.5 * (10 * beta - 5.333)))))


def official_prepare(comps, prompt, alpha=0.01):
    # the concept subspace is pooled at the first end-of-text token in both (the same for keywords)
    _, concept_pooled = comps.encode_prompts(KEYWORDS)
    cs = projection_matrix(concept_pooled.T)
    tokens = comps.tokenize([prompt])
    text_e = comps.encode_ids(tokens.input_ids)[0][0]
    masked = official_masked_encode_prompt(comps, prompt)
    ms = projection_matrix(masked.T)
    safe_e, rm = official_safree_projection(text_e, masked, ms, cs, alpha)
    return safe_e, rm, official_svf_steps(text_e, ms, cs, tokens.attention_mask[0])


def ours(comps, prompt, compat):
    g = SAFREE(KEYWORDS, ", ".join(KEYWORDS), typed_preset(SAFREEConfig, "safree", compat=compat))
    state = g.prepare(comps, [prompt], comps.tokenize([prompt]), None, 7.5, 10)
    return state.extra["safe_e"][0], state.meta[0], state.extra["t_sv"][0]


@pytest.mark.parametrize("prompt", [SHORT, LONG, ONE], ids=["short", "over-77-tokens", "one-token"])
def test_official_mode_equals_the_official_functions(tiny, prompt):
    with torch.no_grad():
        safe_ref, rm, steps_ref = official_prepare(tiny, prompt)
        safe, meta, steps = ours(tiny, prompt, "official")
    flagged_ref = [i for i, v in enumerate(rm.tolist()) if v == 0.0]
    assert meta["safree_triggers"] == flagged_ref
    torch.testing.assert_close(safe, safe_ref, atol=1e-5, rtol=1e-5)
    assert steps == steps_ref


def test_where_official_and_fixed_differ(tiny):
    with torch.no_grad():
        long_official = ours(tiny, LONG, "official")[1]
        one_official, one_fixed = ours(tiny, ONE, "official")[1], ours(tiny, ONE, "fixed")[1]
        short_official, short_fixed = ours(tiny, SHORT, "official")[1], ours(tiny, SHORT, "fixed")[1]
    # over 77 tokens: every masked prompt pools at the start token, no token is flagged
    assert long_official["safree_triggers"] == [] and long_official["safree_compat_differs"]
    assert "start token" in long_official["safree_note"]
    # one token: the official mean of an empty list is NaN, so the token is flagged; fixed keeps it
    assert one_official["safree_triggers"] == [0] and one_fixed["safree_triggers"] == []
    assert one_official["safree_compat_differs"] and one_fixed["safree_compat_differs"]
    # an ordinary prompt: the same tokens flagged by both
    assert short_official["safree_triggers"] == short_fixed["safree_triggers"]
    assert not short_official["safree_compat_differs"]


def test_official_mode_leaves_a_long_prompt_as_plain_cfg_with_the_keyword_negative(tiny):
    """No token flagged: the image is classifier-free guidance with the keywords as negative prompt."""
    g = SAFREE(KEYWORDS, ", ".join(KEYWORDS), typed_preset(SAFREEConfig, "safree", compat="official"))
    with torch.no_grad():
        a = sample(tiny, [LONG], [3], g, steps=4).images
        b = sample(tiny, [LONG], [3], Guidance(), steps=4, negative_prompts=[", ".join(KEYWORDS)]).images
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_paper_experiments_use_official_and_others_fixed():
    for exp in ("nudity_duo", "violence_duo", "nudity_duo_transfer"):
        cfg = compose([f"+experiment={exp}", "guidance=safree"], hydra=False)
        assert cfg.guidance.compat == "official", exp
    assert compose(["+experiment=toy_duo", "guidance=safree"], hydra=False).guidance.compat == "fixed"
    assert compose(["guidance=safree"], hydra=False).guidance.compat == "fixed"
    cfg = compose(["+experiment=nudity_duo", "guidance=safree", "guidance.compat=fixed"], hydra=False)
    g = make_guidance(cfg.guidance, cfg.task, Concept("explicit", [], "x"))
    assert g.settings.compat == "fixed" and g.describe()["compat"] == "fixed"


def test_compat_differs_counts_prompts_whose_conditioning_differs_beyond_float_tolerance(tiny):
    """An exactly-77-token prompt keeps its end-of-text token (the official slicing does nothing), so
    both modes flag the same tokens; but the float32 pinverse of its singular 75 x 75 Gram matrix
    moves the projected embeddings far beyond float rounding. It counts as differing; a short prompt,
    whose modes agree to float rounding, does not."""
    from unlearn_exp.guidance.safree import COMPAT_TOLERANCE

    exact = " ".join(["purple"] + ["circle"] * 74)
    assert tiny.tokenize([exact]).n_tokens == [77]
    with torch.no_grad():
        for prompt, expected in ((exact, True), (SHORT, False)):
            (fixed_e, fixed, fixed_t), (off_e, off, off_t) = (
                ours(tiny, prompt, "fixed"),
                ours(tiny, prompt, "official"),
            )
            gap = (fixed_e.float() - off_e.float()).abs().max().item()
            assert fixed["safree_triggers"] == off["safree_triggers"] and fixed_t == off_t, prompt
            assert (gap > COMPAT_TOLERANCE * max(1.0, fixed_e.abs().max().item())) == expected, (prompt, gap)
            assert fixed["safree_compat_differs"] == off["safree_compat_differs"] == expected, prompt
