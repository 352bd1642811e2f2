"""Fetch a published prompt file into the data cache, checked against its pinned sha256 (docs/methods.md 7.1).

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

from unlearn_exp.atomic import atomic_file
from unlearn_exp.errors import UserError
from unlearn_exp.hashing import file_sha256

CHUNK = 1 << 20


def git_blob_sha1(path: str | Path) -> str:
    """Git's object id of a file's content (``sha1("blob <size>\\0" + bytes)``), as GitHub shows it."""
    data = Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _matches(path: Path, sha256: str | None, git_blob: str | None) -> bool:
    if sha256 and file_sha256(path) != sha256:
        return False
    return not git_blob or git_blob_sha1(path).startswith(git_blob)


def fetch(
    url: str,
    sha256: str | None,
    dest: str | Path,
    *,
    git_blob: str | None = None,
    timeout: float = 60.0,
    local_hint: str = "set benchmark.path to a local copy",
) -> Path:
    """Download ``url`` to ``dest`` unless a file with the expected hash is already there.

    The pin is the file's full ``sha256``; where only the git blob id of the published file is
    known (a prefix of at least 12 hex digits, as for Q16's ``prompts.p``) it may pin instead.
    """
    dest = Path(dest)
    sha256 = str(sha256).lower() if sha256 else None
    git_blob = str(git_blob).lower() if git_blob else None
    if sha256 and len(sha256) != 64:
        raise UserError(f"a download needs the file's full sha256 (64 hex digits), got '{sha256}' for {url}")
    if not sha256 and (not git_blob or len(git_blob) < 12):
        raise UserError(f"a download needs a pinned sha256 (or a git blob id of >= 12 digits) for {url}")
    if dest.is_file() and _matches(dest, sha256, git_blob):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if dest.is_file() and _matches(dest, sha256, git_blob):
            return dest
        h = hashlib.sha256()
        with atomic_file(dest) as tmp:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
                    while block := resp.read(CHUNK):
                        h.update(block)
                        out.write(block)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                raise UserError(f"cannot download {url}: {exc}; {local_hint}") from None
            got = h.hexdigest()
            if git_blob and not git_blob_sha1(tmp).startswith(git_blob):
                raise UserError(
                    f"git blob id mismatch for {url}: expected {git_blob}..., "
                    f"got {git_blob_sha1(tmp)[:16]}... "
                    "(truncated or changed download; deleted, nothing cached)"
                )
            if sha256 and got != sha256:
                # atomic_file deletes the temporary file when the block raises
                raise UserError(
                    f"sha256 mismatch for {url}: expected {sha256}, got {got} "
                    "(truncated or changed download; deleted, nothing cached)"
                )
    return dest
