"""Canonical JSON and content hashes: the ground floor every identity is computed with.

``to_plain`` turns a composed config node into plain dicts and lists; ``canonical_json`` writes it
with sorted keys (``500`` and ``500.0`` alike); ``config_hash`` is the sha256 of that text, the name of
every artifact and cell; ``file_sha256`` hashes a file by blocks. Imports nothing of the project.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def canonical(obj: Any) -> Any:
    if isinstance(obj, DictConfig | ListConfig):
        obj = OmegaConf.to_container(obj, resolve=True, enum_to_str=True)
    if isinstance(obj, dict):
        return {str(k): canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, list | tuple):
        return [canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj.is_integer():
        return int(obj)  # 500 and 500.0 name the same artifact
    return obj


def to_plain(node: Any) -> Any:
    """An OmegaConf node as plain dicts and lists (resolved; an ``Enum`` value as its string); anything
    else unchanged."""
    if isinstance(node, DictConfig | ListConfig):
        return OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    return node


def canonical_json(obj: Any) -> str:
    return json.dumps(canonical(obj), sort_keys=True, separators=(",", ":"))


def config_hash(obj: Any, length: int = 16) -> str:
    """Stable hash of a config subtree (dicts in any key order, DictConfigs, paths)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
