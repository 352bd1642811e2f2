"""Errors that reach the user as one line, without a traceback, and the guard every command uses."""

import sys


class UserError(Exception):
    """A problem with the user's input or environment; printed as one line by the CLI."""


class NotImplementedStage(UserError):
    """A pipeline stage that this version of the framework does not provide yet."""

    def __init__(self, stage: str):
        super().__init__(f"not implemented yet: {stage}")
        self.stage = stage


def run_guarded(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; a ``UserError`` becomes one line on stderr and exit status 2, Ctrl-C
    one line saying what was kept and exit status 130."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print(
            "interrupted: finished artifacts are kept in the cache and no result was written for this "
            "job; run the same command again to resume",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(130)
