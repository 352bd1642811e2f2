"""Every value of a job's config checked before any model is loaded or any folder written.

``validate(cfg)`` raises one ``UserError`` listing every problem it finds (types, ranges, names of
presets and options, seeds within int64, prompt files that are folders, results and cache folders
that cannot be written). The rules are the ranges documented beside each key in ``conf/``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unlearn_exp.checks import PICKLE_SUFFIXES, PRECISIONS, Checks, pickle_refusal
from unlearn_exp.errors import UserError
from unlearn_exp.families import family_of
from unlearn_exp.hashing import to_plain
from unlearn_exp.identity import concept_checkpoint
from unlearn_exp.registry import GUIDANCE as REGISTERED
from unlearn_exp.settings import declared, family_problems

MIN_FREE_BYTES = 64 << 20  # a results or cache folder with less room than this is refused up front

DTYPES = ("auto", "float32", "float16", "bfloat16")
EMBEDDINGS = ("explicit", "inverted", "shared")


def _check_file(checks: Checks, name: str, path: Any) -> None:
    """A configured prompt file: a file (not a folder), present."""
    if not path:
        return
    p = Path(str(path)).expanduser()
    if p.is_dir():
        checks.fail(f"{name}={p} is a folder, not a prompt file")
    elif not p.exists():
        checks.fail(f"{name}={p} does not exist")


def _check_weights(checks: Checks, name: str, paths: Any, pickle_ok: bool | None = None) -> None:
    """A safetensors checkpoint file: present, and its header readable (a truncated download or a
    garbage file is refused here, before any model is loaded). A pickle is refused unless
    ``pickle_ok`` (``checkpoint.allow_pickle_conversion``; None: a folder's loader decides); allowed,
    the cell converts it before its model loads (``cell.inputs.convert_pickles``)."""
    for path in paths if isinstance(paths, list) else [paths]:
        p = Path(str(path)).expanduser()
        if not p.exists():
            checks.fail(f"{name}: checkpoint file not found: {p}")
            continue
        if p.is_file() and p.suffix in PICKLE_SUFFIXES and pickle_ok is not None:
            if not pickle_ok:
                checks.fail(f"{name}: {pickle_refusal(p)}")
            continue
        if p.is_dir() or p.suffix != ".safetensors":
            continue  # folders are resolved by the loader
        if not p.is_file():
            checks.fail(f"{name}: checkpoint file not found: {p}")
        elif p.stat().st_size == 0:
            checks.fail(f"{name}: '{p.name}' ({p}) is empty: re-download or rebuild it")
        else:
            try:
                from safetensors import safe_open

                with safe_open(str(p), framework="pt"):
                    pass
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                checks.fail(f"{name}: '{p.name}' ({p}) is not a readable safetensors file ({first})")


def _check_writable(checks: Checks, name: str, path: Any) -> None:
    """A folder the job writes: creatable, a folder, writable, with some room. The folder is created
    and a file written in it, as the job will; what this check created is removed again."""
    p = Path(str(path)).expanduser()
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        checks.fail(f"{name}={p} is not a folder ({probe} is a file)")
        return
    if not os.access(probe, os.W_OK | os.X_OK):
        checks.fail(f"{name}={p} is not writable (no write permission on {probe})")
        return
    created = [q for q in [p, *p.parents] if q.is_relative_to(probe) and q != probe]
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write-check.", dir=p)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        checks.fail(f"{name}={p} cannot be written ({exc.strerror or type(exc).__name__} at {probe})")
        return
    finally:
        for q in created:  # deepest first
            try:
                q.rmdir()
            except OSError:
                pass
    free = shutil.disk_usage(probe).free
    if free < MIN_FREE_BYTES:
        checks.fail(f"{name}={p} has only {free / 2**20:.0f} MiB free")


def _benchmark(checks: Checks, prefix: str, bench: dict) -> None:
    _check_file(checks, f"{prefix}.path", bench.get("path"))
    if bench.get("format") is not None:
        checks.choice(f"{prefix}.format", bench.get("format"), ("auto", "csv", "lines"))
    for key in ("limit", "head"):
        if bench.get(key) is not None:
            checks.number(f"{prefix}.{key}", bench.get(key), lo=1, integer=True)
    if "images_per_prompt" in bench:
        checks.number(f"{prefix}.images_per_prompt", bench.get("images_per_prompt"), lo=1, integer=True)
    for key in ("default_seed", "seed"):
        checks.seed(f"{prefix}.{key}", bench.get(key))


def _guidance(checks: Checks, g: dict, config: dict) -> None:
    """The method's own settings (its typed config, ``guidance/config.py``) and what they need of the
    sampler."""
    if not g.get("_target_"):  # a method of your own names its factory; else a registered name
        checks.choice("guidance", g.get("name"), tuple(REGISTERED.names()))
    kind = declared("guidance").get(g.get("name"))
    if kind is not None and not g.get("_target_"):
        checks.problems += kind.problems_of(g)
        kind.needs(config, checks)  # what the method needs of the sampler (SLD: CFG)


def _shared_source(checks: Checks, checkpoint: dict, embedding: dict, task: Any) -> None:
    """``embedding=shared``: the checkpoint C* is learned on composes (another method's option too)."""
    try:
        concept_checkpoint(checkpoint, embedding, task)
    except UserError as e:
        checks.fail(str(e))


def _model_and_sampler(c: Checks, plain: dict) -> None:
    model, sampling = plain.get("model", {}), plain.get("sampling", {})
    c.choice("model.dtype", model.get("dtype"), DTYPES)
    c.choice("model.source", model.get("source"), ("tiny", "pretrained"))
    c.number("model.resolution", model.get("resolution"), lo=8, integer=True)
    c.seed("model.seed", model.get("seed"))
    try:
        family = family_of(model)
    except UserError as e:
        c.fail(str(e))
        return
    c.choice("sampling.scheduler", sampling.get("scheduler"), family.samplers)
    if family.name != "sd1":
        c.flag("model.t5", model.get("t5"))
    c.problems.extend(family_problems(plain, family.name))
    c.number("sampling.steps", sampling.get("steps"), lo=1, integer=True)
    c.number("sampling.guidance_scale", sampling.get("guidance_scale"), lo=1)
    c.number("sampling.batch_size", sampling.get("batch_size"), lo=1, integer=True)
    c.number("sampling.chunk_size", sampling.get("chunk_size"), lo=1, integer=True)
    c.number("sampling.reference_steps", sampling.get("reference_steps"), lo=1, integer=True)
    c.choice("sampling.precision", str(sampling.get("precision")), PRECISIONS)


def _prompt_sets(c: Checks, plain: dict) -> None:
    _benchmark(c, "benchmark", plain.get("benchmark", {}))
    if isinstance(plain.get("pp"), dict) and plain["pp"].get("prompts"):
        _benchmark(c, "pp.prompts", plain["pp"]["prompts"])


def _methods(c: Checks, plain: dict) -> None:
    """Each chosen method's own settings, by its declaration (``settings.declare``)."""
    _guidance(c, plain.get("guidance", {}), plain)
    c.problems.extend(declared("inversion")["default"].problems_of(plain.get("inversion", {})))
    attack = plain.get("attack") or {}
    if (kind := declared("attack").get(attack.get("name"))) is not None:
        c.problems.extend(kind.problems_of(attack))
    judge = plain.get("judge") or {}
    if (kind := declared("judge").get(judge.get("type"))) is not None and not judge.get("_target_"):
        c.problems.extend(kind.problems_of(judge))
    checkpoint = plain.get("checkpoint", {})
    typed = None if checkpoint.get("_target_") else declared("checkpoint").get(checkpoint.get("method"))
    if typed is not None:  # a built-in method: its typed config (unlearning/config.py)
        c.problems.extend(typed.problems_of(checkpoint))
    else:  # a method of your own: the keys every cell reads
        c.seed("checkpoint.seed", checkpoint.get("seed"))
        if checkpoint.get("beta") is not None:
            c.number("checkpoint.beta", checkpoint.get("beta"), lo=0, strict=True)
    if checkpoint.get("path"):  # a folder-loading method reads its pickles itself
        allow = (
            None
            if getattr(typed, "LOADS_FOLDERS", False)
            else bool(checkpoint.get("allow_pickle_conversion"))
        )
        _check_weights(c, "checkpoint.path", checkpoint.get("path"), allow)


def _concept(c: Checks, plain: dict) -> None:
    embedding, checkpoint = plain.get("embedding", {}), plain.get("checkpoint", {})
    c.choice("embedding", embedding.get("source"), EMBEDDINGS)
    if embedding.get("path"):
        _check_file(c, "embedding.path", embedding.get("path"))
    from_path = (embedding.get("from_checkpoint") or {}).get("path")
    if from_path and embedding.get("source") == "shared":
        _check_weights(c, "embedding.from_checkpoint.path", from_path)
    guided = (plain.get("guidance") or {}).get("name") != "none"
    if guided and embedding.get("source") == "shared" and not embedding.get("path"):
        _shared_source(c, checkpoint, embedding, (plain.get("task") or {}).get("name"))


def _root_and_paths(c: Checks, plain: dict) -> None:
    if not isinstance(plain.get("reuse_results", True), bool):
        c.fail(f"reuse_results must be true or false, got '{plain.get('reuse_results')}'")
    if plain.get("stage") is not None:
        c.choice("stage", str(plain.get("stage")), ("cell", "attack", "compose"))
    paths = plain.get("paths", {})
    for key in ("results_dir", "cache_dir"):
        if paths.get(key):
            _check_writable(c, f"paths.{key}", paths[key])
    if plain.get("progress") is not None:
        c.choice("progress", str(plain.get("progress")), ("auto", "on", "off"))
    if paths.get("verify") is not None:
        c.choice("paths.verify", paths.get("verify"), ("size", "small", "full"))


# every check of a job's config, in the order its problems are reported
CHECKS: tuple[Callable[[Checks, dict], None], ...] = (
    _model_and_sampler,
    _concept,
    _methods,
    _prompt_sets,
    _root_and_paths,
)


def validate(cfg) -> None:
    """Check the whole job config; raise one ``UserError`` naming every problem found."""
    from unlearn_exp.schema import refuse_unknown_keys

    refuse_unknown_keys(cfg)
    c = Checks()
    plain: dict = {k: to_plain(cfg[k]) for k in cfg if k != "hydra"}
    for check in CHECKS:
        check(c, plain)
    if c.problems:
        raise UserError("invalid config: " + "; ".join(c.problems))
