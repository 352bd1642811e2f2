"""Content-addressed artifacts: keyed by a hash of the config that determines them, written atomically.

An artifact is a folder ``<cache_dir>/<kind>/<hash>/`` holding its files and ``_key.json`` (the
config it was built from, and the size and sha256 of every file it holds). It is built in a
temporary folder beside its final place and renamed into place only when complete, under a file
lock, so that a killed job leaves nothing half-written and two parallel jobs never build the same
artifact twice.

An artifact is verified before it is used: sizes always, sha256 of files up to 1 MiB (of all files
with ``verify="full"``, ``paths.verify=full``). One that fails is moved to
``<cache_dir>/quarantine/`` (one log line names it) and built again. Folders and files follow the
umask, so a cache can be shared by a group. ``python -m unlearn_exp.store gc`` removes what killed
jobs left (temporary folders, stale locks).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from unlearn_exp.atomic import atomic_dir, atomic_write_json
from unlearn_exp.errors import UserError, exit_status
from unlearn_exp.hashing import canonical, config_hash, file_sha256

KEY_FILE = "_key.json"
SMALL_FILE = 1 << 20  # files up to this size are hashed on every reuse
STALE_S = 24 * 3600  # temporary folders older than this are removed by any build of their kind
VERIFY_MODES = ("size", "small", "full")
WORK_SUFFIX = "_work"  # <cache>/<kind>_work/<h>/: the resumable work folder of <cache>/<kind>/<h>

log = logging.getLogger("unlearn_exp")


def manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size", "sha256"}}`` of every file in an artifact folder but ``_key.json``."""
    out = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != KEY_FILE:
            out[f.relative_to(folder).as_posix()] = {"size": f.stat().st_size, "sha256": file_sha256(f)}
    return out


def verify_folder(folder: Path, mode: str = "small") -> str | None:
    """Why ``folder`` does not hold what its manifest says, or None if it does."""
    try:
        meta = json.loads((folder / KEY_FILE).read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable {KEY_FILE} ({exc.__class__.__name__})"
    files = meta.get("files")
    if not isinstance(files, dict):
        return "no file manifest (built by an older version)"
    for rel, info in files.items():
        f = folder / rel
        try:
            size = f.stat().st_size
        except OSError:
            return f"{rel} is missing"
        if size != int(info["size"]):
            return f"{rel} has {size} bytes, its manifest says {info['size']}"
        if (mode == "full" or size <= SMALL_FILE) and file_sha256(f) != info["sha256"]:
            return f"{rel} does not match its sha256"
    return None


def _owner(name: str) -> str:
    """The artifact a cache entry belongs to: ``.<h>.<x>.tmp``, ``.<h>.old<pid>``, ``<h>.work`` and
    ``<h>.lock`` all belong to ``<h>`` (the artifact's folder name)."""
    return name.lstrip(".").split(".", 1)[0]


def _held(lock: Path) -> bool:
    """Whether a running job holds ``lock`` (an exclusive lock that cannot be taken at once)."""
    try:
        with FileLock(str(lock), timeout=0):
            return False
    except Timeout:
        return True
    except OSError:  # unreadable: treat it as held rather than remove what may be in use
        return True


def held_artifacts(root: Path) -> set[str]:
    """The names of the artifacts anywhere under ``root`` whose build lock a running job holds."""
    if not root.is_dir():
        return set()
    return {lock.name[: -len(".lock")] for lock in root.rglob("*.lock") if lock.is_file() and _held(lock)}


def _guards(root: Path, p: Path) -> list[Path]:
    """The build locks of the artifacts ``p`` (under ``root``) belongs to: ``<owner>.lock`` beside ``p``
    and beside each folder that holds it (``<kind>/<h>.work/...`` belongs to ``<kind>/<h>.lock``), and
    for ``<kind>_work/<h>/...`` (``inversion_work``) ``<kind>/<h>.lock``."""
    parts = p.relative_to(root).parts
    locks = [root.joinpath(*parts[:i], f"{_owner(part)}.lock") for i, part in enumerate(parts)]
    if len(parts) > 1 and parts[0].endswith(WORK_SUFFIX):
        locks.append(root / parts[0][: -len(WORK_SUFFIX)] / f"{_owner(parts[1])}.lock")
    return locks


def _claim(stack: ExitStack, locks: list[Path]) -> bool:
    """Take each existing lock of ``locks`` without waiting (released when ``stack`` closes); False if
    a running job holds one. A missing lock is not created: no build holds it, and one that starts
    now makes temporary folders of its own."""
    for lock in locks:
        if lock.is_file():
            try:
                stack.enter_context(FileLock(str(lock), timeout=0))
            except (Timeout, OSError):  # held, or unreadable: leave what it guards
                return False
    return True


def remove_stale(
    folder: Path, older_than_s: float = STALE_S, held: set[str] | None = None, root: Path | None = None
) -> list[Path]:
    """Remove temporary folders/files (``.*.tmp``, ``.*.old<pid>``) and unheld ``.lock`` files in
    ``folder`` older than ``older_than_s``; return what was removed. Whatever belongs to an artifact
    whose lock a running job holds (its build folder, its swap folder) is never touched, whatever its
    age: ``held`` names such artifacts (default: the locks in ``folder``), and each entry is removed
    holding its artifact's lock (taken without waiting; skipped if a job holds it), so a build that
    starts meanwhile keeps its folders. ``root``: the cache ``folder`` lies in (default ``folder``)."""
    removed = []
    if not folder.is_dir():
        return removed
    root = folder if root is None else root
    if held is None:
        held = {p.name[: -len(".lock")] for p in folder.glob("*.lock") if _held(p)}
    now = time.time()
    for p in folder.iterdir():
        try:
            age = now - p.lstat().st_mtime
        except OSError:
            continue
        if age < older_than_s or _owner(p.name) in held:
            continue
        stale_tmp = p.name.startswith(".") and (
            p.name.endswith(".tmp") or ".old" in p.name or ".tmp." in p.name
        )
        if not stale_tmp and not (p.suffix == ".lock" and p.is_file()):
            continue
        with ExitStack() as stack:
            if not _claim(stack, _guards(root, p)):  # a build started since ``held`` was read
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# ----------------------------------------------------------------------------- the store
class ArtifactStore:
    """``get_or_build(kind, key, build)`` returns the folder of an artifact, building it at most once."""

    def __init__(self, root: str | Path, shipped: list[str | Path] | None = None, verify: str = "small"):
        if verify not in VERIFY_MODES:
            raise UserError(f"paths.verify must be one of {list(VERIFY_MODES)}, got '{verify}'")
        self.root = Path(root)
        self.verify = verify
        # read-only caches shipped with the project (the toy world's unlearned checkpoints and
        # embeddings): an artifact found there under the same key is used instead of being built
        self.shipped = [Path(p) for p in (shipped or [])]
        self.built: list[str] = []  # "kind/hash" built by this process
        self.reused: list[str] = []
        self.quarantined: list[str] = []
        self._verified: set[str] = set()  # folders verified by this store (once per process)

    def path(self, kind: str, key: Any) -> Path:
        return self.root / kind / config_hash(key)

    def exists(self, kind: str, key: Any) -> bool:
        return (self.path(kind, key) / KEY_FILE).is_file()

    def locate(self, kind: str, key: Any) -> Path | None:
        """The folder of a built artifact (this cache first, then the shipped ones), unverified; None
        where it is not built. For looking without building (``plan``)."""
        name = config_hash(key)
        for root in [self.root, *self.shipped]:
            if (root / kind / name / KEY_FILE).is_file():
                return root / kind / name
        return None

    def _usable(self, folder: Path, tag: str, quarantine: bool) -> bool:
        """Whether an existing artifact holds what its manifest says; a broken one is moved to
        quarantine (``quarantine=True``, the writable cache) or passed over (a shipped cache)."""
        if not (folder / KEY_FILE).is_file():
            return False
        stamp = f"{folder}|{(folder / KEY_FILE).stat().st_mtime_ns}"
        if stamp in self._verified:
            return True
        problem = verify_folder(folder, self.verify)
        if problem is None:
            self._verified.add(stamp)
            return True
        if not quarantine:
            log.warning("shipped artifact %s is damaged (%s): building it instead", folder, problem)
            return False
        target = self.root / "quarantine" / tag.replace("/", "__")
        target = target.with_name(f"{target.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(folder, target)
        except OSError:
            shutil.rmtree(folder, ignore_errors=True)
            target = Path("(removed)")
        self.quarantined.append(tag)
        log.warning("artifact %s failed verification (%s): moved to %s; rebuilding it", tag, problem, target)
        return False

    def get_or_build(self, kind: str, key: Any, build: Callable[[Path], Any]) -> Path:
        """Return ``<root>/<kind>/<hash>``; if absent (or damaged), call ``build(tmp_folder)`` to fill it."""
        final = self.path(kind, key)
        tag = f"{kind}/{final.name}"
        if (final / KEY_FILE).is_file():
            with FileLock(str(final) + ".lock"):  # never judge a folder another job is swapping
                if self._usable(final, tag, quarantine=True):
                    self.reused.append(tag)
                    return final
        for root in self.shipped:
            if self._usable(root / kind / final.name, tag, quarantine=False):
                self.reused.append(tag)
                return root / kind / final.name
        final.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(final) + ".lock"):
            if self._usable(final, tag, quarantine=True):  # another job built it while we waited
                self.reused.append(tag)
                return final
            for stale in final.parent.glob(f".{final.name}.*.tmp"):  # left by a killed build
                shutil.rmtree(stale, ignore_errors=True)
            remove_stale(final.parent)
            start = time.time()
            with atomic_dir(final) as tmp:
                build(tmp)
                atomic_write_json(
                    tmp / KEY_FILE,
                    {
                        "kind": kind,
                        "key": canonical(key),
                        "built_s": round(time.time() - start, 3),
                        "files": manifest(tmp),
                    },
                )
            self._verified.add(f"{final}|{(final / KEY_FILE).stat().st_mtime_ns}")
        self.built.append(tag)
        return final

    def summary(self) -> dict[str, list[str]]:
        return {"built": list(self.built), "reused": list(self.reused), "quarantined": list(self.quarantined)}


def _is_cache(root: Path) -> bool:
    """Whether the folder ``root`` is an artifact cache: empty (nothing built yet), or holding an
    artifact (``<kind>/<h>/_key.json``, a kind being one or two folders deep), a build lock or a
    temporary folder."""
    if next(root.iterdir(), None) is None:
        return True
    marks = (f"{kind}{mark}" for kind in ("*", "*/*") for mark in (f"/*/{KEY_FILE}", "/*.lock", "/.*.tmp"))
    return any(next(root.glob(pattern), None) is not None for pattern in marks)


def gc(root: str | Path, older_than_s: float = STALE_S) -> list[Path]:
    """Remove stale temporary folders and unheld lock files anywhere in the cache ``root``. Nothing
    that belongs to an artifact a running job holds is touched, at any age: its build and swap
    folders, its resumable work folder (``<h>.work``, ``inversion_work/<h>``) and what lies in them;
    a build that starts during the walk is seen when its folders are reached. A ``root`` that is
    missing or not an artifact cache is a ``UserError``."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"no artifact cache at {root}: no such folder (name paths.cache_dir with --cache)")
    if not root.is_dir():
        raise UserError(f"{root} is a file, not an artifact cache folder")
    if not _is_cache(root):
        raise UserError(
            f"{root} is not an artifact cache: no <kind>/<hash>/{KEY_FILE}, lock file or temporary folder "
            "in it (only an empty folder passes, as a new cache); nothing was removed"
        )
    removed = []
    held = held_artifacts(root)  # a fast pass; each removal takes its artifact's lock (remove_stale)
    folders = [root, *(p for p in root.rglob("*") if p.is_dir() and not p.name.startswith("."))]
    for folder in folders:
        inside = folder.relative_to(root).parts
        if any(_owner(part) in held for part in inside):  # within a live job's folders
            continue
        if folder.exists():
            removed += remove_stale(folder, older_than_s, held, root=root)
    return removed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m unlearn_exp.store",
        description=(
            "Artifact cache maintenance. gc: remove temporary folders and lock files left by killed jobs."
        ),
    )
    ap.add_argument("command", choices=["gc"])
    ap.add_argument(
        "--cache",
        default=os.environ.get("UNLEARN_EXP_CACHE", ".cache/artifacts"),
        help="the artifact cache (paths.cache_dir; default %(default)s)",
    )
    ap.add_argument(
        "--hours",
        type=float,
        default=24.0,
        help="remove only what is older than this many hours (default %(default)s; 0: all unheld)",
    )
    args = ap.parse_args(argv)

    def run() -> int:
        removed = gc(args.cache, args.hours * 3600)
        for p in removed:
            print(f"removed {p}")
        print(f"{len(removed)} stale item(s) removed under {args.cache}")
        return 0

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
