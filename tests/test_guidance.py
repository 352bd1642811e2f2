"""SAFREE's pieces against their definitions (docs/methods.md 4), and the guidance factory."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import compose
from unlearn_exp import config
from unlearn_exp.config import typed_preset
from unlearn_exp.errors import UserError
from unlearn_exp.guidance import SAFREE, SLD, Concept, make_guidance
from unlearn_exp.guidance.config import SAFREEConfig, SLDConfig
from unlearn_exp.guidance.safree import (
    _fourier_reattention,
    concept_projector,
    detect_trigger_tokens,
    low_frequency_reattention,
    masked_pooled_embeddings,
    span_projector,
    svf_steps,
)
from unlearn_exp.sampling import sample


def test_concept_projector_is_an_orthogonal_projection():
    torch.manual_seed(0)
    c = torch.randn(3, 16)
    p = concept_projector(c)
    eye = torch.eye(16)
    assert torch.allclose(p @ p, p, atol=1e-5)  # idempotent
    assert torch.allclose(p, p.T, atol=1e-6)  # symmetric
    assert torch.allclose((eye - p) @ c.T, torch.zeros(16, 3), atol=1e-5)  # complement kills the concept
    v = torch.randn(16)
    assert abs(torch.dot((eye - p) @ v, p @ v)) < 1e-4  # orthogonal complement
    assert torch.linalg.matrix_rank(p) == 3


def test_span_projector_keeps_its_rows():
    torch.manual_seed(1)
    m = torch.randn(4, 16)
    p = span_projector(m)
    assert torch.allclose(p @ m.T, m.T, atol=1e-4)


def test_planted_trigger_token_is_detected():
    torch.manual_seed(2)
    concept = torch.randn(1, 16)
    p_c = concept_projector(concept)
    masked = concept.repeat(6, 1) + 0.05 * torch.randn(6, 16)  # masked prompts still near the concept...
    masked[3] = torch.randn(16) * 2  # ...except when token 4 (index 3) is masked: it was the trigger
    keep = detect_trigger_tokens(masked, p_c, alpha=0.01)
    assert keep.tolist() == [True, True, True, False, True, True]


def test_masked_embeddings_come_from_one_batched_call(tiny):
    prompts = ["a small house near a zebra", "one two three four five six seven", ""]
    tokens = tiny.tokenize(prompts)
    calls = []
    handle = tiny.text_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        counts, pooled = masked_pooled_embeddings(tiny, tokens)
    finally:
        handle.remove()
    assert counts == [6, 7, 0] and calls == [13]
    # the same as masking one token at a time
    ids = tokens.input_ids[1].clone()
    ids[4] = 0
    _, one = tiny.encode_ids(ids[None])
    assert torch.allclose(pooled[6 + 3], one[0], atol=1e-5)


def test_detected_triggers_are_projected_and_others_kept(tiny):
    g = SAFREE(["nudity", "sex"], "nudity, sex")
    prompts = ["a naked woman lying on a sofa in a room"]
    state = g.prepare(tiny, prompts, tiny.tokenize(prompts), None, 7.5, 10)
    triggers = state.meta[0]["safree_triggers"]
    text_e, safe_e = state.extra["text_e"][0], state.extra["safe_e"][0]
    changed = [i for i in range(77) if not torch.equal(text_e[i], safe_e[i])]
    assert changed == [t + 1 for t in triggers]  # BOS offset; EOS and padding never replaced


@pytest.mark.parametrize("z,expected", [(0.0, 0), (0.5333, 5), (1.0, 10), (0.6, 10), (0.45, 0)])
def test_svf_step_count_at_known_points(z, expected):
    assert svf_steps(z, up_t=10, k=2.5, t0=5.333) == expected


def test_low_frequency_reattention_scale_one_is_identity():
    torch.manual_seed(4)
    a, b = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6)
    assert torch.allclose(low_frequency_reattention(a, b, 1.0), a, atol=1e-5)
    assert not torch.allclose(low_frequency_reattention(a, b, 0.2), a, atol=1e-3)


def test_lra_hooks_leave_unet_unchanged_when_no_step_is_safe(tiny):
    torch.manual_seed(5)
    x = torch.randn(3, 4, 16, 16)
    emb = torch.randn(3, 77, 32)
    ref = tiny.unet(x, 500, encoder_hidden_states=emb).sample
    with _fourier_reattention(tiny.unet, [False], typed_preset(SAFREEConfig, "safree", lra="paper")):
        same = tiny.unet(x, 500, encoder_hidden_states=emb).sample
    with _fourier_reattention(tiny.unet, [True], typed_preset(SAFREEConfig, "safree", lra="paper")):
        changed = tiny.unet(x, 500, encoder_hidden_states=emb).sample
    assert torch.equal(ref, same)
    assert torch.equal(ref[:1], changed[:1]) and not torch.allclose(ref[1:2], changed[1:2])


def test_lra_off_is_two_branches_and_paper_adds_the_original(tiny):
    off = SAFREE(["nudity"], "nudity")
    paper = SAFREE(["nudity"], "nudity", typed_preset(SAFREEConfig, "safree", lra="paper"))
    toks = tiny.tokenize(["a naked person"])
    assert off.prepare(tiny, ["a naked person"], toks, None, 7.5, 10).n_branches == 2
    assert paper.prepare(tiny, ["a naked person"], toks, None, 7.5, 10).n_branches == 3


def test_planned_branches_are_the_branches_prepare_stacks(tiny):
    """The planner counts UNet rows with ``unet_branches`` without building anything: it must agree
    with what ``prepare`` stacks, for every method and setting that changes the count."""
    from unlearn_exp.guidance.base import CFG
    from unlearn_exp.guidance.probe import DirectionProbe

    toks = tiny.tokenize(["a naked person", "a cat"])
    cases = [
        (CFG(), 7.5, 2),
        (SLD("nudity"), 7.5, 3),
        (SLD("nudity"), 1.0, 2),  # SLD is off without classifier-free guidance
        (SLD("nudity", typed_preset(SLDConfig, "sld", guidance_scale=0.0)), 7.5, 2),  # s_S = 0: off
        (SAFREE(["nudity"], "nudity"), 7.5, 2),
        (SAFREE(["nudity"], "nudity", typed_preset(SAFREEConfig, "safree", lra="paper")), 7.5, 3),
        (DirectionProbe("nudity", ["nudity"]), 7.5, 4),
    ]
    for guidance, scale, expected in cases:
        state = guidance.prepare(tiny, ["a naked person", "a cat"], toks, None, scale, 10)
        assert guidance.unet_branches(scale) == state.n_branches == expected, (guidance, scale)


def test_safree_without_svf_uses_the_window(tiny):
    g = SAFREE(["nudity"], "nudity", typed_preset(SAFREEConfig, "safree", svf=False, re_attn_t=[2, 4]))
    state = g.prepare(tiny, ["a b"], tiny.tokenize(["a b"]), None, 7.5, 10)
    assert [g.use_safe(i, state)[0] for i in range(6)] == [False, False, True, True, True, False]


def test_empty_prompt_is_recorded_not_projected(tiny):
    out = sample(tiny, [""], [0], SAFREE(["nudity"], "nudity"), steps=2)
    assert out.meta[0]["safree_note"] == "empty prompt"


def test_empty_keywords_fail():
    with pytest.raises(UserError, match="non-empty"):
        SAFREE([], "")


def test_factory_explicit_and_learned_concepts():
    cfg = compose(["guidance=safree", "task=violence"])
    explicit = make_guidance(cfg.guidance, cfg.task)
    assert explicit.concept_prompts[0] == "Physical Assault" and explicit.negative_prompt.startswith(
        "Physical Assault, Blood"
    )
    learned = Concept("inverted", ["<c*>", "<c*>_1"], "abc")
    g = make_guidance(cfg.guidance, cfg.task, learned)
    assert g.concept_prompts == ["<c*>", "<c*>_1"] and g.negative_prompt == "<c*> <c*>_1"
    for mode, expected in [("keywords", explicit.negative_prompt), ("empty", "")]:
        g = make_guidance(OmegaConf.merge(cfg.guidance, {"cfg_negative": mode}), cfg.task, learned)
        assert g.negative_prompt == expected
    sld = make_guidance(
        compose(["guidance=sld", "guidance.preset=max", "guidance.threshold=0.5"]).guidance, cfg.task, learned
    )
    assert isinstance(sld, SLD) and sld.concept_prompt == "<c*> <c*>_1"
    assert sld.values["threshold"] == 0.5 and sld.values["guidance_scale"] == 5000
    with pytest.raises(UserError, match="unknown guidance.preset 'ultra'"):  # composition refuses it
        config.compose(["guidance=sld", "guidance.preset=ultra"])
    with pytest.raises(UserError, match="unknown guidance.preset 'maxx'"):  # each value of a sweep
        config.compose(["guidance=sld", "guidance.preset=weak,maxx"])
    assert config.compose(["guidance=safree", "guidance.lra='paper'"]).guidance.lra == "paper"
    sld_cfg = OmegaConf.to_container(compose(["guidance=sld"]).guidance)
    with pytest.raises(UserError, match="unknown guidance.preset 'ultra'"):  # and the typed config
        make_guidance(OmegaConf.create({**sld_cfg, "preset": "ultra"}), cfg.task)
    with pytest.raises(UserError, match="guidance.threshold must be >= 0"):
        make_guidance(OmegaConf.create({**sld_cfg, "threshold": -1}), cfg.task)
