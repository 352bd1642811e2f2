"""Seconds per Ring-A-Bell prompt (``attacks/ring_a_bell.py``): the genetic search on a text encoder.

    python -m unlearn_exp.bench.ring_a_bell [--model toy|tiny] [--population 64] [--generations 100] [--k 8]

Prints one JSON line: the text encoder, the GA settings, seconds per prompt and per generation,
and what the paper's settings (population 200, 3000 generations) would take at that rate.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from unlearn_exp.bench import bench_model


def main(argv: list[str] | None = None) -> dict:
    from unlearn_exp.attacks.ring_a_bell import (
        concept_vector,
        encode_ids,
        genetic_search,
        prompt_ids,
        search_vocabulary,
    )

    p = argparse.ArgumentParser(
        prog="python -m unlearn_exp.bench.ring_a_bell", description=__doc__.splitlines()[0]
    )
    p.add_argument("--model", default="toy", choices=("toy", "tiny"))
    p.add_argument("--population", type=int, default=64)
    p.add_argument("--generations", type=int, default=100)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    comps = bench_model(args.model)
    bases = ["a grape", "a plum", "an eggplant", "an amethyst"][: args.prompts]
    v = concept_vector(comps, ["a purple circle", "purple"], ["a circle", ""])
    vocab = search_vocabulary(comps, "prompts", [*bases, "a purple circle"])
    start = time.perf_counter()
    for i, base in enumerate(bases):
        target = encode_ids(comps, prompt_ids(comps, [base]))[0] + 3.0 * v
        genetic_search(
            comps,
            target,
            vocab,
            k=args.k,
            population=args.population,
            generations=args.generations,
            mutation_rate=0.25,
            crossover_rate=0.5,
            seed=i,
        )
    per_prompt = (time.perf_counter() - start) / len(bases)
    per_generation = per_prompt / (args.generations + 1)
    out = {
        "text_encoder": args.model,
        "population": args.population,
        "generations": args.generations,
        "k": args.k,
        "threads": args.threads,
        "s_per_prompt": round(per_prompt, 3),
        "s_per_generation": round(per_generation, 5),
        "paper_settings_s_per_prompt": round(per_generation * 3001 * 200 / args.population, 1),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
