"""``python -m unlearn_exp [overrides] [--multirun | multirun]``: one grid cell per job.

The bare word ``multirun`` is accepted as a synonym of ``--multirun``. With no arguments at all the
app runs the embedded default: one cell of the toy world (``EMBEDDED_DEFAULT``), offline, on the CPU.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from unlearn_exp import config
from unlearn_exp.cli import run_job
from unlearn_exp.errors import run_guarded

CONF_DIR = str(config.CONF_DIR)


# a cell that runs anywhere: the shipped toy model, DUO beta=500 (shipped), SLD with the words
EMBEDDED_DEFAULT = ["+experiment=toy_duo", "checkpoint.beta=500", "guidance=sld", "embedding=explicit"]


def _default_argv(argv: list[str]) -> list[str]:
    if argv:
        return argv
    print(
        f"no arguments: running one toy-world cell ({' '.join(EMBEDDED_DEFAULT)}); "
        "`python -m unlearn_exp --help` lists the options",
        file=sys.stderr,
        flush=True,
    )
    return list(EMBEDDED_DEFAULT)


def _normalise_argv(argv: list[str]) -> list[str]:
    """Turn the bare word ``multirun`` into ``--multirun`` and put it first, so that it may stand
    anywhere among the overrides (argparse would otherwise cut the override list at it)."""
    words = {"multirun", "--multirun", "-m"}
    rest = [a for a in argv if a not in words]
    return (["--multirun"] if len(rest) < len(argv) else []) + config.ordered(rest)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig):
    return run_job(cfg)


def main() -> None:
    sys.argv = [sys.argv[0], *_normalise_argv(_default_argv(sys.argv[1:]))]
    run_guarded(config.precheck, sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
