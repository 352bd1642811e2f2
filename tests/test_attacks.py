"""Ring-A-Bell as a generator (docs/methods.md 12.1): the concept vector, the genetic search, and
``benchmark=toy_ring_a_bell_generated`` in a toy cell."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import compose
from unlearn_exp.attacks.ring_a_bell import (
    candidate_ids,
    concept_vector,
    encode_ids,
    fitness,
    genetic_search,
    prompt_ids,
    search_vocabulary,
)
from unlearn_exp.config import preset
from unlearn_exp.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_concept_vector_is_the_mean_difference_of_the_encodings(tiny):
    plus, minus = ["a naked woman", "a naked man"], ["a woman", "a man"]
    v = concept_vector(tiny, plus, minus)
    e = lambda p: encode_ids(tiny, prompt_ids(tiny, p))  # noqa: E731
    torch.testing.assert_close(v, (e(plus) - e(minus)).mean(0))
    with pytest.raises(UserError, match="equal, non-empty"):
        concept_vector(tiny, plus, minus[:1])


def test_ring_a_bell_encodes_sd3_prompts_with_clip_l_hidden_states():
    """On SD3 the attack's text encoder is CLIP-L (a model with projection): its encodings are the
    last hidden states (B, 77, D), as on SD v1, not the projected pooled vector."""
    from unlearn_exp.models import build_tiny_sd3

    sd3 = build_tiny_sd3(seed=0, t5=False)
    ids = prompt_ids(sd3, ["a naked woman"])
    e = encode_ids(sd3, ids)
    assert e.shape == (1, 77, 16)
    assert torch.equal(e, sd3.text_encoder(ids).last_hidden_state)
    assert concept_vector(sd3, ["a naked woman"], ["a woman"]).shape == (77, 16)


@pytest.mark.slow
def test_genetic_search_never_loses_its_best_and_recovers_a_planted_prompt(tiny):
    vocab = search_vocabulary(tiny, "prompts", ["a red car on a road at night, oil painting"])
    planted = vocab[torch.tensor([3, 0, 5])]
    target = encode_ids(tiny, candidate_ids(tiny, planted[None]))[0]
    best, history = genetic_search(
        tiny,
        target,
        vocab,
        k=3,
        population=32,
        generations=80,
        mutation_rate=0.25,
        crossover_rate=0.5,
        seed=0,
    )
    assert all(b >= a - 1e-6 for a, b in zip(history, history[1:]))  # best-so-far is monotone
    assert history[-1] > history[0]  # (full-sequence cosines of one length differ little: 0.98 to 1)
    assert history[-1] > 0.999 and best.tolist() == planted.tolist()
    assert float(fitness(tiny, best[None], target)[0]) == pytest.approx(history[-1], abs=1e-5)
    # the same seed, the same search
    again, _ = genetic_search(
        tiny,
        target,
        vocab,
        k=3,
        population=32,
        generations=80,
        mutation_rate=0.25,
        crossover_rate=0.5,
        seed=0,
    )
    assert again.tolist() == best.tolist()
    with pytest.raises(UserError, match="does not fit"):
        candidate_ids(tiny, torch.zeros(1, 80, dtype=torch.long))


@pytest.mark.slow
def test_generated_benchmark_runs_in_a_toy_cell_and_is_cached(tmp_path, monkeypatch):
    from unlearn_exp.attacks import ring_a_bell
    from unlearn_exp.cell import run_cell

    over = [
        "+experiment=toy_duo",
        "checkpoint=original",
        "guidance=none",
        "benchmark=toy_ring_a_bell_generated",
        "benchmark.base.limit=2",
        "benchmark.generations=3",
        "benchmark.population=8",
        "pp.prompts.limit=2",
        "sampling.steps=2",
        "sampling.progress=false",
        f"paths.root_dir={tmp_path}",
        f"paths.output_root={tmp_path}",
    ]
    out = run_cell(compose(over, hydra=False))
    row = out["cell"]
    assert row["benchmark"] == "toy_ring_a_bell_generated" and row["n_images"] == 2
    built = list((tmp_path / ".cache" / "artifacts" / "attacks" / "ring_a_bell").glob("*/prompts.csv"))
    assert len(built) == 1 and "fitness" in built[0].read_text().splitlines()[0]

    def no_generation(*a, **k):
        raise AssertionError("the generated prompts must come from the cache")

    monkeypatch.setattr(ring_a_bell, "generate", no_generation)
    again = run_cell(compose([*over, "reuse_results=false"], hydra=False))
    assert again["cell"]["benchmark_sha256"] == row["benchmark_sha256"]
    # another eta is another prompt set, and another cell identity
    other = compose([*over, "benchmark.eta=5.0"], hydra=False)
    from unlearn_exp.identity import cell_spec, spec_key

    assert spec_key(cell_spec(other)) != row["spec_key"]
    spec = cell_spec(compose(over, hydra=False))["benchmark"]
    assert "model" not in spec and "cache_dir" not in spec and spec["base"]["kind"] == "indirect"


# ----------------------------------------------------------------------------- UnlearnDiffAtk
def _target(res: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return (torch.rand(1, 3, res, res, generator=g) * 2 - 1).clamp(-1, 1)


@pytest.mark.slow
def test_unlearndiffatk_optimises_discrete_tokens_through_the_guidance(tmp_path):
    from unlearn_exp.attacks.unlearndiffatk import AttackSettings, UnlearnDiffAtk, attack, run_attack
    from unlearn_exp.config import typed_preset
    from unlearn_exp.guidance.config import SLDConfig
    from unlearn_exp.guidance.sld import SLD
    from unlearn_exp.models import build_tiny
    from unlearn_exp.store import ArtifactStore

    comps = build_tiny()
    plain_table = comps.text_encoder.get_input_embeddings()
    settings = AttackSettings.from_cfg(
        preset("attack", "unlearndiffatk", k=2, steps=4, seed=0), guidance_scale=7.5, num_steps=10
    )
    module = UnlearnDiffAtk(comps, _target(), "a person", settings)
    before = module.rows.learned.detach().clone()
    loss = module.loss_at(0)
    loss.backward()
    assert (
        module.rows.learned.grad is not None and module.rows.learned.grad.abs().sum() > 0
    )  # straight through
    ids = module.rows.projected_ids()
    assert bool((module.rows.vocab[:, None] == ids[None]).any(0).all())  # projected onto vocabulary rows
    torch.testing.assert_close(module.rows.learned.detach(), before)
    module.restore()
    assert comps.text_encoder.get_input_embeddings() is plain_table

    out = run_attack(comps, _target(), "a person", settings)  # a second attack on the same model
    assert (
        len(out["losses"]) == 4 and out["loss"] == min(out["losses"]) and out["prompt"].endswith("a person")
    )
    # the defence in the loop changes what is optimised
    sld = SLD("nudity", typed_preset(SLDConfig, "sld", preset="max", warmup_steps=0))
    with_sld = run_attack(build_tiny(), _target(), "a person", settings, guidance=sld)
    assert with_sld["losses"][0] != pytest.approx(out["losses"][0], abs=1e-6)

    store = ArtifactStore(tmp_path / "cache")
    key = {"model": "tiny", "checkpoint": "original", "guidance": "none", "target": "t0"}
    first = attack(build_tiny(), store, key, _target(), "a person", settings)
    again = attack(build_tiny(), ArtifactStore(tmp_path / "cache"), key, _target(), "a person", settings)
    assert again == first and len(store.built) == 1
    with pytest.raises(UserError, match="one RGB target"):
        UnlearnDiffAtk(build_tiny(), torch.zeros(2, 3, 8, 8), "x", settings)


def test_unlearndiffatk_runs_on_the_toy_model():
    from unlearn_exp.attacks.unlearndiffatk import AttackSettings, run_attack
    from unlearn_exp.models import load_pretrained
    from unlearn_exp.toy.pretrain import WEIGHTS_DIR
    from unlearn_exp.toy.world import render_example, to_tensor_batch

    comps = load_pretrained(str(WEIGHTS_DIR), name="toy", resolution=32, vae=False)
    image, _, _ = render_example(7)
    out = run_attack(
        comps,
        to_tensor_batch([image])[:1],
        "a grape",
        AttackSettings.from_cfg(
            preset("attack", "unlearndiffatk", k=2, steps=3), guidance_scale=7.5, num_steps=25
        ),
    )
    assert len(out["losses"]) == 3 and out["prompt"].endswith("a grape")
