"""Errors that reach the user as one line, without a traceback, and the guard every command uses."""

import errno
import sys


class UserError(Exception):
    """A problem with the user's input or environment; printed as one line by the CLI."""


class NotImplementedStage(UserError):
    """A pipeline stage that this version of the framework does not provide yet."""

    def __init__(self, stage: str):
        super().__init__(f"not implemented yet: {stage}")
        self.stage = stage


INTERRUPTED = (
    "interrupted: finished artifacts are kept in the cache and no result was written for this job; run "
    "the same command again to resume"
)


def _report(exc: BaseException) -> int:
    """Print ``exc`` as one line on stderr; return its exit status (2 for a UserError, 130 for Ctrl-C)."""
    if isinstance(exc, KeyboardInterrupt):
        print(INTERRUPTED, file=sys.stderr, flush=True)
        return 130
    print(f"error: {exc}", file=sys.stderr, flush=True)
    return 2


def _disk_full(exc: OSError) -> UserError | None:
    """A full disk met outside the project's atomic writers (which name what they wrote) as a
    ``UserError``; None for any other ``OSError``."""
    if exc.errno != errno.ENOSPC:
        return None
    where = f" while writing '{exc.filename}'" if exc.filename else ""
    return UserError(
        f"no space left on the device{where}: free space (or point paths.cache_dir/paths.results_dir "
        "elsewhere), then run the same command again (finished artifacts are kept)"
    )


def exit_status(fn, *args, **kwargs) -> int:
    """The exit status of a command's body ``fn`` (its return value, 0 for None); a ``UserError``
    (a full disk included) becomes one line on stderr and 2, Ctrl-C one line saying what was kept
    and 130."""
    try:
        return int(fn(*args, **kwargs) or 0)
    except (UserError, KeyboardInterrupt) as e:
        return _report(e)
    except OSError as e:
        if (full := _disk_full(e)) is None:
            raise
        return _report(full)


def run_guarded(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``'s value; on a ``UserError``, a full disk or Ctrl-C, ``exit_status``'s
    line and exit."""
    try:
        return fn(*args, **kwargs)
    except (UserError, KeyboardInterrupt) as e:
        sys.exit(_report(e))
    except OSError as e:
        if (full := _disk_full(e)) is None:
            raise
        sys.exit(_report(full))
