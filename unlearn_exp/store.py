"""Content-addressed artifacts: keyed by a hash of the config that determines them, written atomically.

An artifact is a folder ``<cache_dir>/<kind>/<hash>/`` holding its files and ``_key.json`` (the
config it was built from). It is built in a temporary folder beside its final place and renamed
into place only when complete, under a file lock, so that a killed job leaves nothing half-written
and two parallel jobs never build the same artifact twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock

KEY_FILE = "_key.json"


def _canonical(obj: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, DictConfig | ListConfig):
            obj = OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, list | tuple):
        return [_canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj.is_integer():
        return int(obj)  # 500 and 500.0 name the same artifact
    return obj


def canonical_json(obj: Any) -> str:
    return json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":"))


def config_hash(obj: Any, length: int = 16) -> str:
    """Stable hash of a config subtree (dicts in any key order, DictConfigs, paths)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- atomic writes
@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path`` (an existing folder is swapped out)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- the store
class ArtifactStore:
    """``get_or_build(kind, key, build)`` returns the folder of an artifact, building it at most once."""

    def __init__(self, root: str | Path, shipped: list[str | Path] | None = None):
        self.root = Path(root)
        # read-only caches shipped with the project (the toy world's unlearned checkpoints and
        # embeddings): an artifact found there under the same key is used instead of being built
        self.shipped = [Path(p) for p in (shipped or [])]
        self.built: list[str] = []  # "kind/hash" built by this process
        self.reused: list[str] = []

    def path(self, kind: str, key: Any) -> Path:
        return self.root / kind / config_hash(key)

    def exists(self, kind: str, key: Any) -> bool:
        return (self.path(kind, key) / KEY_FILE).is_file()

    def get_or_build(self, kind: str, key: Any, build: Callable[[Path], Any]) -> Path:
        """Return ``<root>/<kind>/<hash>``; if absent, call ``build(tmp_folder)`` to fill it first."""
        final = self.path(kind, key)
        tag = f"{kind}/{final.name}"
        if (final / KEY_FILE).is_file():
            self.reused.append(tag)
            return final
        for root in self.shipped:
            if (root / kind / final.name / KEY_FILE).is_file():
                self.reused.append(tag)
                return root / kind / final.name
        final.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(final) + ".lock"):
            if (final / KEY_FILE).is_file():  # another job built it while we waited
                self.reused.append(tag)
                return final
            for stale in final.parent.glob(f".{final.name}.*.tmp"):  # left by a killed build
                shutil.rmtree(stale, ignore_errors=True)
            start = time.time()
            with atomic_dir(final) as tmp:
                build(tmp)
                atomic_write_json(
                    tmp / KEY_FILE,
                    {"kind": kind, "key": _canonical(key), "built_s": round(time.time() - start, 3)},
                )
        self.built.append(tag)
        return final

    def summary(self) -> dict[str, list[str]]:
        return {"built": list(self.built), "reused": list(self.reused)}
