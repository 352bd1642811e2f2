"""What a result *is*, by content: one module for model, file and cell identities.

Every cache key and every cell row names what produced it by content, never by where it lies:

- ``file_identity(path)``: ``sha256:<hex>`` of a file, or of a folder's files (relative names and
  their hashes). Hashes are cached on disk by (absolute path, size, mtime, inode, ctime), so a 4 GB
  checkpoint is read once per machine (``$UNLEARN_EXP_HASH_CACHE``, default
  ``~/.cache/unlearn_exp/sha256.json``).
- ``model_identity(model_cfg)``: ``<name>:<hash>`` from the weight, config and tokenizer files of the
  subfolders the model loads (a hub id is resolved through the local cache first), the dtype it
  will run in (``auto`` resolved) and its resolution. The same weights copied to another folder, or
  the project cloned elsewhere, give the same identity.
- ``resolved_dtype`` / ``resolved_precision``: ``auto`` turned into what will actually run.
- ``cell_spec(cfg)``: the whole configuration that determines a cell's numbers, with file paths
  replaced by content and run-time knobs (devices, chunk sizes, judges' batch sizes, progress bars,
  output folders) left out. ``spec_key`` is its hash: the report takes a table position's cell by it
  (docs/results.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from filelock import FileLock

from unlearn_exp import config
from unlearn_exp.atomic import atomic_write_text
from unlearn_exp.config import compose
from unlearn_exp.errors import UserError
from unlearn_exp.families import family_of, required_parts
from unlearn_exp.hashing import canonical_json, config_hash, file_sha256, to_plain
from unlearn_exp.paths import resolve_local_path

# subfolders of a diffusers model folder that a model loads, and the files in them that decide it
MODEL_PARTS = ("unet", "text_encoder", "tokenizer", "scheduler", "vae")
MODEL_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model", ".ckpt", ".pt")

# per config group, the keys that change how a job runs but not a number it produces. The sampler's
# batch size is not among them: how many rows one UNet call holds changes an image's last bits
# (docs/results.md), so it is part of the spec and of every sample key. Judges and metrics work
# image by image and threshold or average: their batch sizes stay run-time knobs.
RUNTIME_KEYS: dict[str, tuple[str, ...]] = {
    "model": ("device", "path", "source"),
    "sampling": ("devices", "chunk_size", "progress"),
    "judge": (
        "batch_size",
        "device",
        "num_threads",
        "cache_dir",
        "model_path",
        "prompts_path",
        "prompts_url",
        "clip_path",
    ),
    "pp": ("batch_size", "device", "trunk_path", "lin_path"),
    "checkpoint": ("checkpoint_every", "allow_pickle_conversion", "path", "beta_label"),
    "inversion": ("checkpoint_every", "log_every_n_steps"),
    "benchmark": ("path", "url", "file", "source_hint", "expected_prompts", "sha256", "model", "cache_dir"),
}

# Keys added after results existed, at the value that reproduces the earlier behaviour: a key at
# this value is left out of identities (and of a method's describe(), the sample keys), so adding
# the option re-keys nothing.
NEUTRAL_KEYS: dict[str, dict[str, Any]] = {
    "checkpoint": {"condition": "null", "beta_map": None, "train_resolution": None, "text_length": None},
    "inversion": {"prompt_tokens": "all"},
    "guidance": {"strength": 1.0},
}


def without_neutral(group: str, node: dict[str, Any]) -> dict[str, Any]:
    """``node`` without the keys of ``group`` that sit at their neutral value (``NEUTRAL_KEYS``)."""
    neutral = NEUTRAL_KEYS.get(group, {})
    return {k: v for k, v in node.items() if not (k in neutral and v == neutral[k])}


# ----------------------------------------------------------------------------- file hashes
def _hash_cache_path() -> Path:
    env = os.environ.get("UNLEARN_EXP_HASH_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "unlearn_exp" / "sha256.json"


_MEMO: dict[str, str] = {}


def _stat_key(path: Path) -> str:
    """What an edit of the file changes: size and mtime, and the inode and ctime that an in-place
    edit with its size and mtime restored (``os.utime``) or a file swapped in by rename still change."""
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}"


def cached_sha256(path: str | Path) -> str:
    """``sha256`` of a file, computed once per (absolute path, size, mtime, inode, ctime) here."""
    path = Path(path)
    key = _stat_key(path)
    if key in _MEMO:
        return _MEMO[key]
    store = _hash_cache_path()
    table: dict[str, str] = {}
    try:
        table = json.loads(store.read_text())
    except (OSError, ValueError):
        table = {}
    if key not in table:
        table[key] = file_sha256(path)
        try:  # a read-only home is no reason to fail: the hash is then recomputed next time
            store.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(store) + ".lock", timeout=10):
                try:
                    current = json.loads(store.read_text())
                except (OSError, ValueError):
                    current = {}
                current[key] = table[key]
                atomic_write_text(store, json.dumps(current, sort_keys=True))
        except Exception:
            pass
    _MEMO[key] = table[key]
    return table[key]


def folder_files(folder: Path, parts: tuple[str, ...] | None = None) -> list[Path]:
    """The files of a folder that decide its content (weights, configs, tokenizer files), sorted."""
    roots = [folder / p for p in parts] if parts else [folder]
    files = []
    for root in roots:
        if root.is_dir():
            files += [
                f
                for f in root.rglob("*")
                if f.is_file() and f.suffix in MODEL_SUFFIXES and ".cache" not in f.parts
            ]
    return sorted(files)


def file_identity(path: str | Path, parts: tuple[str, ...] | None = None) -> str:
    """``sha256:<hex>`` of a file, or of a folder (each relevant file's relative name and sha256)."""
    path = Path(path)
    if path.is_file():
        return "sha256:" + cached_sha256(path)
    files = folder_files(path, parts)
    listing = [[f.relative_to(path).as_posix(), cached_sha256(f)] for f in files]
    return "sha256:" + hashlib.sha256(canonical_json(listing).encode()).hexdigest()


def _content_of(value: Any) -> Any:
    """A path (or list of paths) replaced by its content identity where the file exists here."""
    if isinstance(value, list):
        return [_content_of(v) for v in value]
    if isinstance(value, str) and value:
        local = Path(resolve_local_path(value))
        if local.exists():
            return file_identity(local)
    return value


# ----------------------------------------------------------------------------- model
# device files without which no process here can reach a CUDA (or ROCm) GPU, on Linux
_GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg", "/dev/kfd")


def _no_gpu_possible() -> bool:
    """True where torch cannot see a CUDA device, known without importing torch (seconds): a Linux
    machine without NVIDIA, WSL or ROCm device files, or a Mac. Elsewhere torch is asked."""
    if sys.platform == "darwin":
        return True
    return sys.platform.startswith("linux") and not any(os.path.exists(p) for p in _GPU_DEVICE_FILES)


def resolved_device(model_cfg) -> str:
    """``model.device`` with ``auto`` resolved: ``cuda`` where torch sees a GPU, else ``cpu``."""
    device = str(model_cfg.get("device", "auto"))
    if device == "auto":
        if _no_gpu_possible():
            return "cpu"
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolved_dtype(model_cfg) -> str:
    """``model.dtype`` with ``auto`` resolved: float16 on a GPU, float32 on the CPU."""
    name = str(model_cfg.get("dtype", "float32"))
    if name == "auto":
        name = "float16" if resolved_device(model_cfg).startswith("cuda") else "float32"
    return name


def resolved_precision(precision: str | None, device: str | None = None) -> str:
    """Lightning's precision for a ``precision`` key (``auto``: 16-mixed on a GPU, 32-true on the CPU;
    ``device`` None: this machine's default device)."""
    p = str(precision or "auto")
    if p == "auto":
        return "16-mixed" if str(device or resolved_device({})).startswith("cuda") else "32-true"
    return p


def model_folder(model_cfg) -> Path | None:
    """The local folder of a pretrained model (a path, or a hub id in the local cache); None if absent."""
    path = str(model_cfg.get("path") or "")
    if not path:
        return None
    local = Path(resolve_local_path(path))
    if local.is_dir():
        return local
    if path.count("/") == 1 and not path.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(path, local_files_only=True))
        except Exception:
            return None
    return None


@lru_cache(maxsize=64)
def _folder_model_hash(folder: str, parts: tuple[str, ...], stamp: str) -> str:
    return file_identity(Path(folder), parts).removeprefix("sha256:")


def model_content_hash(model_cfg) -> str | None:
    """The hash of the weights ``model_cfg`` names; None where they are not on this machine."""
    source = model_cfg.get("source", "pretrained")
    if source == "tiny" and family_of(model_cfg).name != "sd1":
        return config_hash({"tiny": {k: model_cfg.get(k) for k in ("family", "seed", "resolution", "t5")}})
    if source == "tiny":
        return config_hash({"tiny": {k: model_cfg.get(k) for k in ("seed", "resolution", "vae")}})
    folder = model_folder(model_cfg)
    if folder is None:
        return None
    parts = required_parts(model_cfg)  # the family's subfolders (SD v1: MODEL_PARTS, the VAE if used)
    stamp = "|".join(_stat_key(f) for f in folder_files(folder, parts))
    return _folder_model_hash(str(folder), parts, stamp)


def model_identity(model_cfg) -> str:
    """``<name>:<hash>`` of the model as it will run: weights by content, dtype resolved, resolution.

    Raises ``UserError`` when the weights are not here (a job cannot run without them).
    """
    content = model_content_hash(model_cfg)
    if content is None:
        raise UserError(
            f"no weights for model '{model_cfg.get('name')}' at model.path='{model_cfg.get('path')}'"
        )
    return f"{model_cfg.get('name')}:{_model_hash(content, model_cfg)}"


def _model_hash(content: str | None, model_cfg) -> str:
    spec = {
        "weights": content,
        "dtype": resolved_dtype(model_cfg),
        "resolution": int(model_cfg.get("resolution", 512)),
        "vae": bool(model_cfg.get("vae", True)),
    }
    family = family_of(model_cfg)
    if family.name != "sd1":  # SD v1 identities keep their shape (and value)
        spec.update(family=family.name, t5=bool(model_cfg.get("t5", True)))
        if model_cfg.get("text_length") is not None:  # the toy MMDiT's (SD3's configs keep their identity)
            spec["text_length"] = int(model_cfg.get("text_length"))
    return config_hash(spec)


# ----------------------------------------------------------------------------- cells
def _drop(group: str, node: Any, device: str | None = None) -> dict[str, Any]:
    """A group's config without its run-time keys, ``precision: auto`` resolved for ``device``."""
    node = dict(to_plain(node) or {})
    out = {k: v for k, v in node.items() if k not in RUNTIME_KEYS.get(group, ())}
    out = without_neutral(group, out)
    if "precision" in out:
        out["precision"] = resolved_precision(out["precision"], device)
    return out


def checkpoint_spec(ck: Any, device: str | None = None) -> dict[str, Any]:
    """A checkpoint by what determines its weights: the user's files by content, else the recipe."""
    ck = dict(to_plain(ck) or {})
    spec = _drop("checkpoint", ck, device)
    if ck.get("path"):
        paths = ck["path"] if isinstance(ck["path"], list) else [ck["path"]]
        # what decides how the files are applied (DUO's adapter weights, SPM's multiplier) and the
        # variant's label; the beta of a file is only its label
        keep = ("method", "adapter_weights", "variant", "multiplier")
        spec = {k: ck.get(k) for k in keep if k in ck}
        spec["files"] = [_content_of(str(p)) for p in paths]
    elif spec.get("filter"):
        spec["filter"] = judge_spec(spec["filter"])
    return spec


def benchmark_spec(bench: Any) -> dict[str, Any]:
    """A prompt set by content: the file's sha256 (the user's file, else the pinned download)."""
    bench = dict(to_plain(bench) or {})
    spec = _drop("benchmark", bench)
    if bench.get("path"):
        spec["content"] = _content_of(str(bench["path"]))
    elif bench.get("sha256"):
        spec["content"] = "sha256:" + str(bench["sha256"]).lower()
    elif bench.get("url"):
        spec["content"] = str(bench["url"])
    if isinstance(bench.get("base"), dict):  # a generated benchmark: its base prompt set by content
        spec["base"] = benchmark_spec(bench["base"])
    pairs = bench.get("concept_pairs")
    if isinstance(pairs, dict) and pairs.get("path"):
        spec["concept_pairs"] = {**pairs, "path": None, "content": _content_of(str(pairs["path"]))}
    return spec


def judge_spec(judge: Any) -> dict[str, Any]:
    """A judge profile by content: pinned hashes stay, local files are hashed, run-time keys go."""
    judge = dict(to_plain(judge) or {})
    spec = _drop("judge", judge)
    for key in ("model_path", "prompts_path", "clip_path"):
        if judge.get(key):
            spec[key] = _content_of(str(judge[key]))
    return spec


def concept_checkpoint(
    checkpoint: dict[str, Any], embedding: dict[str, Any], task: str | None, debug: Any = None
) -> dict[str, Any]:
    """The checkpoint config ``C*`` is learned on: the cell's own, or for ``embedding=shared`` the one
    ``embedding.from_checkpoint`` names. Of the cell's own method, its non-null keys (and ``path``)
    replace the cell's (``beta: 500``: the same recipe at another beta). Of another method (the
    methods grid: C* from DUO beta 500 on an ESD checkpoint), the checkpoint option
    ``from_checkpoint.option`` (default: its method's name) composed for the cell's task, with those
    keys over it. ``debug``: the cell's ``debug`` node (``+debug=default``), under which the option is
    composed too, so a smoke run's shared source is as small as the grid's own checkpoints."""
    if embedding.get("source") != "shared":
        return dict(checkpoint)
    src = dict(embedding.get("from_checkpoint") or {})
    option = src.pop("option", None)
    extra = {k: v for k, v in src.items() if v is not None or k == "path"}
    method = extra.get("method", checkpoint.get("method"))
    if method == checkpoint.get("method"):
        return {**checkpoint, **extra}
    debug_json = canonical_json(debug) if debug else None
    return {**_checkpoint_option(str(option or method), task, debug_json), **extra}


@lru_cache(maxsize=32)
def _checkpoint_option_json(option: str, task: str | None, debug_json: str | None = None) -> str:
    if not (config.CONF_DIR / "checkpoint" / f"{option}.yaml").is_file():
        raise UserError(f"embedding.from_checkpoint: no checkpoint option '{option}' (conf/checkpoint/)")
    if task is not None and not (config.CONF_DIR / "task" / f"{task}.yaml").is_file():
        raise UserError(
            f"embedding=shared from another method composes its checkpoint for task '{task}', "
            "which is not a conf/task option"
        )
    small = []
    if debug_json:  # the cell's +debug sizes, which the option's YAML reads (conf/debug/default.yaml)
        small = ["+debug=default", *(f"debug.{k}={v}" for k, v in json.loads(debug_json).items())]
    cfg = compose([*([f"task={task}"] if task else []), f"checkpoint={option}", *small])
    return canonical_json(to_plain(cfg.checkpoint))


def _checkpoint_option(option: str, task: str | None, debug_json: str | None = None) -> dict[str, Any]:
    return json.loads(_checkpoint_option_json(option, task, debug_json))


def cell_spec(cfg) -> dict[str, Any]:
    """Everything that determines a cell's numbers (see the module docstring)."""
    groups = (
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
    )
    plain = {k: to_plain(cfg[k]) for k in groups}
    model = plain["model"]
    device = resolved_device(model)
    content = model_content_hash(model)
    guided = plain["guidance"]["name"] != "none"
    emb = dict(plain["embedding"])
    concept: dict[str, Any] = {"source": emb.get("source") if guided else "none"}
    if guided and emb.get("source") != "explicit":
        if emb.get("path"):
            concept["file"] = _content_of(str(emb["path"]))
        else:
            source_ck = concept_checkpoint(
                plain["checkpoint"], emb, plain["task"].get("name"), to_plain(cfg.get("debug"))
            )
            concept["checkpoint"] = checkpoint_spec(source_ck, device)
            concept["inversion"] = _drop("inversion", plain["inversion"], device)
            image_set = dict(concept["inversion"].get("image_set") or {})
            if image_set.get("filter"):
                image_set["filter"] = judge_spec(image_set["filter"])
            concept["inversion"]["image_set"] = image_set
    sampling = _drop("sampling", plain["sampling"], device)
    pp = dict(plain["pp"])
    return {
        "model": {
            "name": model.get("name"),
            "content": None if content is None else _model_hash(content, model),
        },
        "task": plain["task"],
        "checkpoint": checkpoint_spec(plain["checkpoint"], device),
        "guidance": without_neutral("guidance", plain["guidance"]),
        "concept": concept,
        "sampling": sampling,
        "benchmark": benchmark_spec(plain["benchmark"]),
        "judge": judge_spec(plain["judge"]),
        "pp": {
            "metric": _drop("pp", pp.get("metric") or {}),
            "prompts": benchmark_spec(pp.get("prompts")) if pp.get("prompts") else None,
            "bench": pp.get("bench"),
            "benign_acc_floor": pp.get("benign_acc_floor"),
            "pp_floor": pp.get("pp_floor"),
        },
    }


def spec_key(spec: dict[str, Any]) -> str:
    return config_hash(spec)


def spec_differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys where two specs differ (for 'other cells': why a row is off the grid)."""
    out = []
    for k in sorted(set(a) | set(b), key=str):
        va, vb = a.get(k), b.get(k)
        name = f"{prefix}{k}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out += spec_differences(va, vb, name + ".")
        elif canonical_json(va) != canonical_json(vb):
            out.append(name)
    return out
