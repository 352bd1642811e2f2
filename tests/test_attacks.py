"""Ring-A-Bell as a generator (docs/methods.md 12.1): the concept vector, the genetic search, and
``benchmark=toy_ring_a_bell_generated`` in a toy cell."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import compose
from unlearn_exp.attacks.ring_a_bell import (
    candidate_ids,
    concept_vector,
    encode_ids,
    fitness,
    genetic_search,
    prompt_ids,
    search_vocabulary,
)
from unlearn_exp.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_concept_vector_is_the_mean_difference_of_the_encodings(tiny):
    plus, minus = ["a naked woman", "a naked man"], ["a woman", "a man"]
    v = concept_vector(tiny, plus, minus)
    e = lambda p: encode_ids(tiny, prompt_ids(tiny, p))  # noqa: E731
    torch.testing.assert_close(v, (e(plus) - e(minus)).mean(0))
    with pytest.raises(UserError, match="equal, non-empty"):
        concept_vector(tiny, plus, minus[:1])


def test_genetic_search_never_loses_its_best_and_recovers_a_planted_prompt(tiny):
    vocab = search_vocabulary(tiny, "prompts", ["a red car on a road at night, oil painting"])
    planted = vocab[torch.tensor([3, 0, 5])]
    target = encode_ids(tiny, candidate_ids(tiny, planted[None]))[0]
    best, history = genetic_search(tiny, target, vocab, k=3, population=32, generations=80,
                                   mutation_rate=0.25, crossover_rate=0.5, seed=0)  # fmt: skip
    assert all(b >= a - 1e-6 for a, b in zip(history, history[1:]))  # best-so-far is monotone
    assert history[-1] > history[0]  # (full-sequence cosines of one length differ little: 0.98 to 1)
    assert history[-1] > 0.999 and best.tolist() == planted.tolist()
    assert float(fitness(tiny, best[None], target)[0]) == pytest.approx(history[-1], abs=1e-5)
    # the same seed, the same search
    again, _ = genetic_search(tiny, target, vocab, k=3, population=32, generations=80,
                              mutation_rate=0.25, crossover_rate=0.5, seed=0)  # fmt: skip
    assert again.tolist() == best.tolist()
    with pytest.raises(UserError, match="does not fit"):
        candidate_ids(tiny, torch.zeros(1, 80, dtype=torch.long))


def test_generated_benchmark_runs_in_a_toy_cell_and_is_cached(tmp_path, monkeypatch):
    from unlearn_exp.attacks import ring_a_bell
    from unlearn_exp.cell import run_cell

    over = [
        "+experiment=toy_duo", "checkpoint=original", "guidance=none", "benchmark=toy_ring_a_bell_generated",
        "benchmark.base.limit=2", "benchmark.generations=3", "benchmark.population=8", "pp.prompts.limit=2",
        "sampling.steps=2", "sampling.progress=false", f"paths.root_dir={tmp_path}", f"paths.output_root={tmp_path}",
    ]  # fmt: skip
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
