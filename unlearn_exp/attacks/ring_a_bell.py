"""Ring-A-Bell as a generator (Tsai, Hsu et al., ICLR 2024; docs/methods.md 12.1): adversarial
prompts made against *this* model's text encoder, usable as ``benchmark=*ring_a_bell_generated``.

Ring-A-Bell reads only the text encoder ``E`` (the full sequence of last hidden states):

- concept vector ``v = mean_i [E(p_i^+) - E(p_i^-)]`` over prompt pairs with and without the concept;
- for each base prompt ``P``, the target ``E(P) + eta v``;
- a genetic algorithm over prompts of ``K`` tokens maximises the cosine between ``E(candidate)`` and
  the target: the population is ranked by fitness, the best individual is kept (so the best-so-far
  never falls), parents are drawn from the better half, a child takes a single-point crossover of two
  parents with probability ``crossover_rate`` (else a copy of one), and with probability
  ``mutation_rate`` one of its tokens is replaced by a random token of the vocabulary.

The prompts are decoded from the best token sequence of each base prompt and cached per (text
encoder content, base prompts, pairs, eta, K, GA settings, seed) as ``attacks/ring_a_bell/<hash>``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from unlearn_exp.errors import UserError
from unlearn_exp.hashing import file_sha256, to_plain
from unlearn_exp.identity import model_identity
from unlearn_exp.progress import StageBar
from unlearn_exp.registry import LOADERS
from unlearn_exp.store import ArtifactStore

log = logging.getLogger("unlearn_exp")

PROMPTS_FILE = "prompts.csv"


@torch.no_grad()
def encode_ids(comps, ids: torch.Tensor) -> torch.Tensor:
    """``E`` of token sequences (B, L) already holding start, end and padding tokens: (B, L, D)."""
    # the last hidden state (SD3's CLIP-L is a model with projection: its first output is the pooled one)
    return comps.text_encoder(ids.to(comps.device)).last_hidden_state.float()


def prompt_ids(comps, prompts: list[str]) -> torch.Tensor:
    tok = comps.tokenizer
    return tok(
        prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def concept_vector(comps, with_concept: list[str], without_concept: list[str]) -> torch.Tensor:
    """``v = mean_i [E(p_i^+) - E(p_i^-)]`` (L, D)."""
    if not with_concept or len(with_concept) != len(without_concept):
        raise UserError(
            f"Ring-A-Bell needs equal, non-empty lists of prompts with and without the concept, got "
            f"{len(with_concept)} and {len(without_concept)}"
        )
    plus = encode_ids(comps, prompt_ids(comps, with_concept))
    minus = encode_ids(comps, prompt_ids(comps, without_concept))
    return (plus - minus).mean(0)


def candidate_ids(comps, tokens: torch.Tensor) -> torch.Tensor:
    """Token sequences of K tokens as the text encoder reads them: start, tokens, end, padding."""
    tok = comps.tokenizer
    n, k = tokens.shape
    length = tok.model_max_length
    if k > length - 2:
        raise UserError(
            f"Ring-A-Bell K={k} does not fit the text encoder's {length} positions (K <= {length - 2})"
        )
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((n, length), pad, dtype=torch.long)
    ids[:, 0] = tok.bos_token_id
    ids[:, 1 : k + 1] = tokens
    ids[:, k + 1] = tok.eos_token_id
    return ids


def fitness(comps, tokens: torch.Tensor, target: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Cosine between each candidate's ``E`` (flattened) and the target."""
    out = []
    for start in range(0, len(tokens), batch):
        emb = encode_ids(comps, candidate_ids(comps, tokens[start : start + batch]))
        out.append(
            torch.nn.functional.cosine_similarity(emb.flatten(1), target.flatten()[None].to(emb), dim=1)
        )
    return torch.cat(out).cpu()


def genetic_search(
    comps,
    target: torch.Tensor,
    vocab: torch.Tensor,
    *,
    k: int,
    population: int,
    generations: int,
    mutation_rate: float,
    crossover_rate: float,
    seed: int,
) -> tuple[torch.Tensor, list[float]]:
    """The K-token sequence whose ``E`` is closest (cosine) to ``target``, and the best fitness after
    each generation (non-decreasing: the best individual always survives)."""
    if population < 2 or generations < 0 or k < 1:
        raise UserError(
            "Ring-A-Bell needs population >= 2, generations >= 0, K >= 1 "
            f"(got {population}, {generations}, {k})"
        )
    g = torch.Generator().manual_seed(int(seed))
    vocab = vocab.long()

    def draw(*shape):
        return vocab[torch.randint(len(vocab), shape, generator=g)]

    pop = draw(population, k)
    fit = fitness(comps, pop, target)
    history = []
    for _ in range(generations):
        order = fit.argsort(descending=True)
        pop, fit = pop[order], fit[order]
        history.append(float(fit[0]))
        parents = pop[: max(2, population // 2)]
        n_child = population - 1
        a = parents[torch.randint(len(parents), (n_child,), generator=g)]
        b = parents[torch.randint(len(parents), (n_child,), generator=g)]
        cut = torch.randint(1, k + 1, (n_child, 1), generator=g)
        crossed = torch.where(torch.arange(k)[None] < cut, a, b)
        do_cross = torch.rand(n_child, 1, generator=g) < crossover_rate
        children = torch.where(do_cross, crossed, a)
        mutate = torch.rand(n_child, generator=g) < mutation_rate
        pos = torch.randint(k, (n_child,), generator=g)
        new_tok = draw(n_child)
        children[mutate, pos[mutate]] = new_tok[mutate]
        pop = torch.cat([pop[:1], children])
        fit = torch.cat([fit[:1], fitness(comps, children, target)])
    best = int(fit.argmax())
    history.append(float(fit[best]))
    return pop[best], history


def search_vocabulary(comps, mode: str, prompts: list[str]) -> torch.Tensor:
    """The tokens the search draws from: ``all`` (the tokenizer's ordinary tokens) or ``prompts``
    (the tokens of the base and pair prompts; a small model trained on a small vocabulary)."""
    tok = comps.tokenizer
    special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    if mode == "all":
        ids = torch.arange(len(tok))
    elif mode == "prompts":
        ids = torch.tensor(sorted({int(i) for p in prompts for i in tok(p).input_ids}))
    else:
        raise UserError(f"unknown Ring-A-Bell vocabulary '{mode}': choose all or prompts")
    keep = torch.tensor([int(i) not in special for i in ids])
    return ids[keep]


def generate(
    comps, base: pd.DataFrame, pairs: tuple[list[str], list[str]], settings: dict[str, Any]
) -> pd.DataFrame:
    """One adversarial prompt per base prompt (schema rows with ``fitness``), the base seed kept."""
    v = concept_vector(comps, *pairs)
    prompts = base.drop_duplicates("case_id")
    vocab = search_vocabulary(comps, str(settings["vocabulary"]), [*prompts["prompt"], *pairs[0], *pairs[1]])
    bar = StageBar(
        f"Ring-A-Bell prompts (K={settings['k']}, eta={settings['eta']:g})", len(prompts), "prompt"
    )
    rows = []
    for i, r in enumerate(prompts.itertuples(index=False)):
        target = encode_ids(comps, prompt_ids(comps, [r.prompt]))[0] + float(settings["eta"]) * v
        best, history = genetic_search(
            comps,
            target,
            vocab,
            k=int(settings["k"]),
            population=int(settings["population"]),
            generations=int(settings["generations"]),
            mutation_rate=float(settings["mutation_rate"]),
            crossover_rate=float(settings["crossover_rate"]),
            seed=int(settings["seed"]) + i,
        )
        text = comps.tokenizer.decode(best.tolist(), skip_special_tokens=True).strip()
        rows.append(
            {
                "case_id": str(r.case_id),
                "prompt": text,
                "evaluation_seed": int(r.seed),
                "base_prompt": r.prompt,
                "fitness": history[-1],
                "fitness_start": history[0],
            }
        )
        bar.update(1)
    bar.close()
    return pd.DataFrame(rows)


def _pairs(cfg: dict[str, Any]) -> tuple[list[str], list[str]]:
    pairs = dict(cfg.get("concept_pairs") or {})
    if pairs.get("path"):
        path = Path(str(pairs["path"])).expanduser()
        if not path.is_file():
            raise UserError(f"benchmark.concept_pairs.path: no file at {path}")
        df = pd.read_csv(path)
        cols = [pairs.get("with_column", "prompt"), pairs.get("without_column", "prompt1")]
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise UserError(
                f"{path.name} has no column(s) {missing} (set concept_pairs.with_column/without_column)"
            )
        return [str(x) for x in df[cols[0]]], [str(x) for x in df[cols[1]]]
    return [str(x) for x in pairs.get("with") or []], [str(x) for x in pairs.get("without") or []]


SETTINGS = ("eta", "k", "population", "generations", "mutation_rate", "crossover_rate", "vocabulary", "seed")


@LOADERS.register("ring_a_bell")
def load_generated(cfg, data_dir=None) -> pd.DataFrame:
    """``loader: ring_a_bell``: prompts generated against the cell's text encoder (``benchmark.model``)
    from the base benchmark ``benchmark.base``, cached in ``benchmark.cache_dir``."""
    from unlearn_exp.data import load_benchmark
    from unlearn_exp.data.schema import expand_images, to_prompt_table
    from unlearn_exp.models import load_model

    plain = dict(to_plain(cfg))
    name = str(plain.get("name", "ring_a_bell_generated"))
    if not plain.get("base") or not plain.get("model") or not plain.get("cache_dir"):
        raise UserError(f"benchmark '{name}' (loader ring_a_bell) needs base, model and cache_dir")
    base = load_benchmark(plain["base"], data_dir)
    pairs = _pairs(plain)
    settings = {k: plain.get(k) for k in SETTINGS}
    if any(v is None for v in settings.values()):
        raise UserError(f"benchmark '{name}': set {[k for k, v in settings.items() if v is None]}")
    model_cfg = plain["model"]

    key = {
        "text_encoder": model_identity(model_cfg),
        "base": [base.attrs.get("file_sha256"), base[["case_id", "prompt", "seed"]].to_dict("list")],
        "pairs": pairs,
        "settings": settings,
    }
    store = ArtifactStore(plain["cache_dir"])

    def build(tmp: Path) -> None:
        comps = load_model(model_cfg)
        generate(comps, base, pairs, settings).to_csv(tmp / PROMPTS_FILE, index=False)

    path = store.get_or_build("attacks/ring_a_bell", key, build) / PROMPTS_FILE
    raw = pd.read_csv(path, dtype={"case_id": str}, keep_default_na=False)
    prompts = to_prompt_table(
        raw, path, prompt_column="prompt", seed_column="evaluation_seed", id_column="case_id"
    )
    limit = plain.get("limit")
    if limit is not None:
        prompts = prompts.head(int(limit))
    out = expand_images(prompts, int(plain.get("images_per_prompt") or 1))
    out.attrs.update(
        benchmark=name, file=str(path), file_sha256=file_sha256(path), fitness=float(raw["fitness"].mean())
    )
    return out
