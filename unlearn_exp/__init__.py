"""unlearn-exp: concept unlearning, safety guidance and concept inversion for text-to-image diffusion."""

import os

from omegaconf import OmegaConf

__version__ = "0.1.0"


def _register_resolvers() -> None:
    """``${pid:}`` in folder names (conf/hydra/default.yaml): two jobs started in one second never
    share a run folder."""
    if not OmegaConf.has_resolver("pid"):
        # cached like ${now:}: the jobs of a sweep keep the launcher's value
        OmegaConf.register_new_resolver("pid", lambda: str(os.getpid()), use_cache=True)


_register_resolvers()
__import__("unlearn_exp.schema", fromlist=["register"]).register()  # structured configs (schema.py)

# Lightning's pytree helper calls a torch API that this torch version deprecates: a line on every
# Trainer that a user can do nothing about
__import__("warnings").filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
