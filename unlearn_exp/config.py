"""Composing the project's Hydra configs outside the app (the demo, the report, the planner, tools)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from unlearn_exp.errors import UserError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides: Sequence[str] = (), *, hydra: bool = False):
    """The config ``python -m unlearn_exp <overrides>`` would run; with ``hydra`` the ``hydra`` node
    too (sweep parameters), else overrides of the ``hydra`` node are left out. A config that does not
    compose is one ``UserError``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [o for o in overrides if hydra or not o.lstrip("+~").startswith("hydra")]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=hydra)
    except Exception as e:
        raise UserError(f"cannot compose the config {list(overrides)}: {str(e).splitlines()[0]}") from e
    finally:
        GlobalHydra.instance().clear()
