"""Concept inversion really inverts: a planted token's concept is recovered from its images (issue item 5).

On the shipped toy model (which conditions on text for real), a new token ``<planted>`` is planted
with an embedding row near the row of "blue" (perturbed), so it draws blue shapes while no prompt
word of the inversion names it. Its images are sampled; a fresh copy of the model then inverts
``<c*>`` from the unrelated word "dog" (which draws green shapes on the shipped model). The recovered
token must be closer to the planted one than the initial word: in the denoising loss at high noise
levels, in the toy judge's colour verdicts, and in pixels for the same seeds.
"""

from collections import Counter

import pytest
import torch

from unlearn_exp.config import preset
from unlearn_exp.evaluation import make_judge
from unlearn_exp.inversion.concept_inversion import ConceptInversion, evaluation_loss, invert
from unlearn_exp.inversion.textual_inversion import add_placeholder_tokens
from unlearn_exp.models import load_model
from unlearn_exp.sampling import sample, to_pil

SEEDS = list(range(16))
PLANTED = "blue"
TOY = preset("model", "toy")


def _toy():
    return load_model(TOY)


def _images(comps, prompt):
    return sample(comps, [prompt] * len(SEEDS), SEEDS, steps=20, guidance_scale=6.0).images


def _plant(comps) -> torch.Tensor:
    add_placeholder_tokens(comps, "<planted>", 1, "dog")
    weight = comps.text_encoder.get_input_embeddings().weight
    colour = comps.tokenizer(PLANTED).input_ids[1]
    noise = torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(1))
    row = weight[colour].detach() + 0.1 * weight[:49408].std() * noise
    with torch.no_grad():
        weight[-1] = row
    return row


@pytest.fixture(scope="module")
def judge():
    return make_judge(preset("judge", "toy"))


@pytest.mark.slow
def test_inversion_recovers_the_planted_concept(tmp_path, judge):
    torch.set_num_threads(1)
    planted_comps = _toy()
    row = _plant(planted_comps)
    target = _images(planted_comps, "<planted>")

    comps = _toy()  # the concept is in the model, but no word of the inversion names it
    cfg = preset(
        "inversion", "default", init_word="dog", steps=150, lr=5e-2, batch_size=4, eval_draws=0, seed=0
    )
    invert(comps, target, cfg, tmp_path / "out", progress=False)

    # denoising loss on the same fixed draws, at the noise levels where the prompt decides
    add_placeholder_tokens(comps, "<planted>", 1, "dog")
    with torch.no_grad():
        comps.text_encoder.get_input_embeddings().weight[-1] = row
    add_placeholder_tokens(comps, "<probe>", 1, "dog")
    probe = ConceptInversion(comps, ["<probe>"], target, preset("inversion", "default", init_word="dog"))
    loss = {p: evaluation_loss(probe, p, 32, t_range=(500, 1000)) for p in ("<planted>", "dog", "<c*>")}
    gap = loss["dog"] - loss["<planted>"]
    assert gap > 0, loss
    assert loss["dog"] - loss["<c*>"] > 0.5 * gap, loss  # at least half-way from the init word

    def colours(images):
        return Counter(v["raw"]["colour"] for v in judge.judge(to_pil(images)))

    recovered, init = _images(comps, "<c*>"), _images(comps, "dog")
    assert colours(target)[PLANTED] >= 12, colours(target)
    assert colours(recovered)[PLANTED] >= 10 and colours(init)[PLANTED] <= 2, (
        colours(recovered),
        colours(init),
    )
    d_recovered = ((recovered - target) ** 2).mean().item()
    d_init = ((init - target) ** 2).mean().item()
    assert d_recovered < 0.7 * d_init, (d_recovered, d_init)
