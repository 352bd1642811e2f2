"""The built-in benchmark loaders: published and user prompt files (``i2p``, ``csv``, ``prompts_file``)."""

from __future__ import annotations

from unlearn_exp.data import LOADERS, load_file_benchmark
from unlearn_exp.registry import LOADERS as LOADER_REGISTRY

for _name in LOADERS:
    LOADER_REGISTRY.register(_name, load_file_benchmark)
