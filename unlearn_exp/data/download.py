"""Fetch a published prompt file into the data cache, checked against its pinned sha256 (METHOD.md 7.1).

The project does not ship benchmark CSVs. A benchmark config names the public ``url`` of the file
and its ``sha256``; the file is streamed into a temporary file beside its final place, hashed, and
renamed into ``<data_dir>/<benchmark>/<sha256[:16]>/<file>`` only when the hash matches. A
truncated or altered download is deleted and reported in one line; nothing is cached from it.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from pathlib import Path

from filelock import FileLock

from unlearn_exp.errors import UserError
from unlearn_exp.store import atomic_file, file_sha256

CHUNK = 1 << 20


def fetch(url: str, sha256: str, dest: str | Path, *, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` unless a file with the expected ``sha256`` is already there."""
    dest = Path(dest)
    if not sha256 or len(sha256) != 64:
        raise UserError(f"a download needs the file's full sha256 (64 hex digits), got '{sha256}' for {url}")
    sha256 = sha256.lower()
    if dest.is_file() and file_sha256(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if dest.is_file() and file_sha256(dest) == sha256:
            return dest
        h = hashlib.sha256()
        with atomic_file(dest) as tmp:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
                    while block := resp.read(CHUNK):
                        h.update(block)
                        out.write(block)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                raise UserError(f"cannot download {url}: {exc}; set benchmark.path to a local copy") from None
            got = h.hexdigest()
            if got != sha256:
                # atomic_file deletes the temporary file when the block raises
                raise UserError(
                    f"sha256 mismatch for {url}: expected {sha256}, got {got} "
                    "(truncated or changed download; deleted, nothing cached)"
                )
    return dest
