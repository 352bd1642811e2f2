"""Structured configs: the types of each config group's keys, registered in Hydra's ConfigStore.

A group's YAML names its schema first in its defaults list (``- sld_schema``), so composition refuses
an unknown key, a value of the wrong type or outside an ``Enum``, and the code reads every key
without a default of its own: the values live once, in the YAML. Fields are ``MISSING`` (``???``): a
YAML that leaves one out fails to compose. Numbers that a config may give as an integer or a float
are typed ``Any``, so that a value keeps the type it was written with (identities hash the config).

Each method's settings live beside it, typed (``unlearn_exp/settings.py``): ``guidance/config.py``,
``unlearning/config.py`` (the ``checkpoint`` group), ``inversion/config.py``, ``attacks/config.py``,
``evaluation/config.py`` and ``toy/config.py`` (the ``judge`` group). The groups that are not a
method's (``sampling``, ``model``, ``embedding``, ``pp``) are declared here. ``task`` and
``benchmark`` stay open: a method of your own reads its own task keys (``<method>_<key>``,
docs/usage.md, config groups; README, Extending) and a prompt loader of your own its own benchmark
keys; ``validate.py`` checks the keys the built-in code reads. A config of your own (a new method's
YAML) needs no schema.

Tests and scripts that want a group's values with a few changed take them from the YAML with
``unlearn_exp.config.preset(group, name, **changes)``, never from defaults in code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from unlearn_exp.errors import UserError
from unlearn_exp.settings import declarations


@dataclass
class SamplingConfig:
    """``conf/sampling/default.yaml``: the sampler, its batching and its GPU options."""

    scheduler: str = MISSING
    steps: int = MISSING
    guidance_scale: Any = MISSING
    resolution: Any = MISSING  # ${model.resolution}
    batch_size: int = MISSING
    precision: str = MISSING
    devices: Any = MISSING  # a count or a list of device ids
    chunk_size: int = MISSING
    progress: bool = MISSING
    scale_step_counts: bool = MISSING
    reference_steps: int = MISSING
    compile: bool = MISSING
    channels_last: bool = MISSING
    tf32: bool = MISSING
    vae_slicing: bool = MISSING
    vae_tiling: bool = MISSING


# ----------------------------------------------------------------------------- model
@dataclass
class PretrainedModelConfig:
    """``conf/model/{sd14,toy}.yaml``: a diffusers folder or hub id."""

    name: str = MISSING
    source: str = MISSING
    path: Any = MISSING
    resolution: int = MISSING
    vae: bool = MISSING
    dtype: str = MISSING
    device: str = MISSING


@dataclass
class TinyModelConfig:
    """``conf/model/tiny.yaml``: random components built in memory."""

    name: str = MISSING
    source: str = MISSING
    seed: int = MISSING
    resolution: int = MISSING
    vae: bool = MISSING
    dtype: str = MISSING
    device: str = MISSING


@dataclass
class SD3ModelConfig:
    """``conf/model/sd3.yaml``: a Stable Diffusion 3 diffusers folder or hub id (``family: sd3``)."""

    name: str = MISSING
    family: str = MISSING
    source: str = MISSING
    path: Any = MISSING
    resolution: int = MISSING
    t5: bool = MISSING  # load T5 (text_encoder_3); false: zeros in its place, as SD3's pipeline allows
    vae: bool = MISSING  # true for SD3 (it decodes with its VAE); false: a pixel-space model (the toy MMDiT)
    sampler: str = MISSING  # the family's sampler (sampling.scheduler reads it)
    dtype: str = MISSING
    device: str = MISSING


@dataclass
class ToyMMDiTModelConfig(SD3ModelConfig):
    """``conf/model/toy_mmdit.yaml``: the toy MMDiT, an SD3-family folder without a VAE or T5."""

    text_length: int = MISSING  # T5's tokens, here the zeros in its place (SD3's pipeline: 256; the toy: 0)


@dataclass
class TinySD3ModelConfig:
    """``conf/model/tiny_sd3.yaml``: random SD3 components built in memory (tests)."""

    name: str = MISSING
    family: str = MISSING
    source: str = MISSING
    seed: int = MISSING
    resolution: int = MISSING
    t5: bool = MISSING
    vae: bool = MISSING
    sampler: str = MISSING
    dtype: str = MISSING
    device: str = MISSING


# ----------------------------------------------------------------------------- embedding
@dataclass
class ExplicitEmbeddingConfig:
    source: str = MISSING


@dataclass
class InvertedEmbeddingConfig:
    source: str = MISSING
    path: Any = MISSING  # a learned_embeds.safetensors of your own, else C* is learned


@dataclass
class SharedEmbeddingConfig:
    source: str = MISSING
    path: Any = MISSING
    from_checkpoint: Any = MISSING  # the checkpoint keys C* is learned on


# ----------------------------------------------------------------------------- pp
@dataclass
class PPConfig:
    """``conf/pp/*.yaml`` (docs/methods.md 7.4): the metric, its prompts and the collapse floors."""

    prompts: Any = MISSING  # a benchmark config (the benign prompts)
    metric: Any = MISSING  # {name: ..., the metric's own keys}
    bench: bool = MISSING  # PP also on the benchmark's prompts
    benign_acc_floor: Any = MISSING  # float | None
    pp_floor: Any = MISSING  # float | None


# the groups that are not a method's, declared here; every method's schema comes from its declaration
# (``settings.declare`` in its package's config.py)
CORE_SCHEMAS = {
    ("sampling", "default_schema"): SamplingConfig,
    ("model", "pretrained_schema"): PretrainedModelConfig,
    ("model", "tiny_schema"): TinyModelConfig,
    ("model", "sd3_schema"): SD3ModelConfig,
    ("model", "tiny_sd3_schema"): TinySD3ModelConfig,
    ("model", "toy_mmdit_schema"): ToyMMDiTModelConfig,
    ("embedding", "explicit_schema"): ExplicitEmbeddingConfig,
    ("embedding", "inverted_schema"): InvertedEmbeddingConfig,
    ("embedding", "shared_schema"): SharedEmbeddingConfig,
    ("pp", "pp_schema"): PPConfig,
}
SCHEMAS = {**{(d.group, d.schema): d.settings for d in declarations()}, **CORE_SCHEMAS}


def register() -> None:
    """Put every schema into Hydra's ConfigStore (idempotent), a method declared since included."""
    cs = ConfigStore.instance()
    for (group, name), node in {
        **{(d.group, d.schema): d.settings for d in declarations()},
        **SCHEMAS,
    }.items():
        cs.store(group=group, name=name, node=node)


# ----------------------------------------------------------------------------- unknown keys
# the root config's own keys (conf/config.yaml) and its groups; `debug` (the training sizes of a smoke
# run) is set by +debug=default and read by the methods' YAMLs; a method's own root keys (an
# experiment's setting for it, `safree_compat`) come with its declaration (`root_keys`)
ROOT_KEYS = ("stage", "progress", "reuse_results", "name", "debug", "hydra")
ROOT_GROUPS = (
    "paths",
    "model",
    "task",
    "checkpoint",
    "guidance",
    "embedding",
    "inversion",
    "sampling",
    "benchmark",
    "judge",
    "pp",
    "logger",
    "attack",
    "utility",
)
# keys the command line adds after composition (cli.label_user_checkpoint)
ADDED_KEYS = ("checkpoint.beta_label",)
# groups without a schema whose keys are nevertheless closed (task and benchmark stay open: a method
# or loader of your own reads its own keys there)
CLOSED_PLAIN_GROUPS = {
    "paths": ("root_dir", "output_root", "cache_dir", "data_dir", "results_dir", "shipped_caches", "verify"),
}


def unknown_keys(cfg) -> list[str]:
    """The dotted keys of a composed config that no code reads: a root key that is neither a group
    nor one of ``ROOT_KEYS``, a key that a group's schema does not declare (at any depth), a key of a
    closed plain group. A typo added with ``+`` (``+sampling.stepz=3``) is found here."""
    own = {k for d in declarations() for k in d.root_keys}
    found = [str(k) for k in cfg.keys() if k not in ROOT_KEYS and k not in ROOT_GROUPS and k not in own]

    def walk(node, prefix: str) -> None:
        kind = OmegaConf.get_type(node)
        fields = {f.name for f in dataclasses.fields(kind)} if dataclasses.is_dataclass(kind) else None
        for key in node.keys():
            if fields is not None and key not in fields and f"{prefix}{key}" not in ADDED_KEYS:
                found.append(f"{prefix}{key}")
                continue
            child = node._get_node(key)
            if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
                walk(child, f"{prefix}{key}.")

    for group in ROOT_GROUPS:
        node = cfg._get_node(group) if group in cfg else None
        if not isinstance(node, DictConfig):
            continue
        walk(node, f"{group}.")
        if group in CLOSED_PLAIN_GROUPS:
            found += [f"{group}.{k}" for k in node.keys() if k not in CLOSED_PLAIN_GROUPS[group]]
    return found


def refuse_unknown_keys(cfg) -> None:
    """One ``UserError`` naming every key no code reads (``unknown_keys``)."""
    bad = unknown_keys(cfg)
    if bad:
        raise UserError(
            f"unknown config key{'s' if len(bad) > 1 else ''} {', '.join(bad)}: no code reads "
            f"{'them' if len(bad) > 1 else 'it'} (a typo?)"
        )
