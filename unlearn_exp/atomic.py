"""Atomic writes: a file or folder appears whole or not at all, with the modes the umask allows.

``atomic_file`` yields a temporary path beside the target and renames it into place when the block
succeeds; ``atomic_dir`` does the same for a folder (an existing one is swapped out);
``atomic_write_text``/``bytes``/``json`` write one file. A disk that fills while writing is one
``UserError`` naming the folder and the size (``disk_full``). Files and folders get the modes the
umask allows, as ``open()`` would, so a cache can be shared by a group.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from unlearn_exp.errors import UserError


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``os.umask`` sets it, and a
    file another thread creates meanwhile would get the modes that a umask of 0 gives)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _share(path: Path, folder: bool, mask: int | None = None) -> None:
    """Give a temp file or folder (created 0600/0700) the modes the umask allows, as open() would."""
    try:
        os.chmod(path, (0o777 if folder else 0o666) & ~(_umask() if mask is None else mask))
    except OSError:
        pass


def _share_tree(folder: Path) -> None:
    """``_share`` what a build wrote under ``folder``: writers that replace a file through a temporary
    one of their own (safetensors' ``save_file``) leave it 0600."""
    mask = _umask()
    for p in folder.rglob("*"):
        if not p.is_symlink():
            _share(p, p.is_dir(), mask)


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
        _share(tmp, folder=False)  # after the block: a writer may have replaced the file (safetensors)
        os.replace(tmp, path)
    except Exception as e:
        if is_disk_full(e):
            raise disk_full(path.parent, path.name, _size(tmp)) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    try:
        with atomic_file(path) as tmp:
            tmp.write_bytes(data)
    except UserError as e:  # the disk filled: what this write needed is known
        p = Path(path)
        raise disk_full(p.parent, p.name, 0, len(data)) if "no space left" in str(e) else e from None
    return Path(path)


def _size(path: Path) -> int:
    """Bytes under ``path`` (a file or a folder; 0 where it is gone)."""
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    except OSError:
        return 0


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC, as an ``OSError`` or in the message of a writer that wraps it (safetensors'
    ``SafetensorError``, torch's ``RuntimeError`` from ``torch.save``)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    return not isinstance(exc, UserError) and "No space left on device" in str(exc)


def disk_full(folder: Path, name: str, written: int, need: int | None = None) -> UserError:
    """The one-line error for a disk that filled while ``name`` was written in ``folder`` (ENOSPC):
    the folder, what was written or needed, and what is free there."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = 0
    mib = 1 << 20
    what = f"{need / mib:.1f} MiB needed" if need else f"{written / mib:.1f} MiB written when it filled"
    return UserError(
        f"no space left on the disk holding '{folder}' while writing {name} ({what}, "
        f"{free / mib:.1f} MiB free): free space or point paths.cache_dir/paths.results_dir elsewhere, "
        "then run the same command again (finished artifacts are kept)"
    )


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path`` (an existing folder is swapped out)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    _share(tmp, folder=True)
    try:
        try:
            yield tmp
        except Exception as e:
            if is_disk_full(e):
                raise disk_full(path.parent, f"{path.name}/", _size(tmp)) from None
            raise
        _share_tree(tmp)
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


# ----------------------------------------------------------------------------- manifests
