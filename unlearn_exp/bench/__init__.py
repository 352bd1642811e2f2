"""Benchmark scripts (not tests): ``python -m unlearn_exp.bench.<name>``."""


def bench_model(name: str):
    """The model a CPU benchmark runs on: ``toy`` (the shipped toy weights) or ``tiny`` (random)."""
    if name == "toy":
        from unlearn_exp.models import load_pretrained
        from unlearn_exp.toy.pretrain import WEIGHTS_DIR

        return load_pretrained(str(WEIGHTS_DIR), name="toy", resolution=32, vae=False)
    from unlearn_exp.models import build_tiny

    return build_tiny()
