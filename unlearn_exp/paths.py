"""Where a configured path points: the working directory first, then the repository root."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_local_path(path: str) -> str:
    """A relative folder is looked up from the working directory, then from the repository root
    (so shipped paths such as ``unlearn_exp/toy/weights/model`` work from any directory)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists() or not (REPO_ROOT / p).exists():
        return str(p) if (p.exists() or path.startswith((".", "/", "~"))) else path
    return str(REPO_ROOT / p)
