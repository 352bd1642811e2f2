"""Errors that reach the user as one line, without a traceback."""


class UserError(Exception):
    """A problem with the user's input or environment; printed as one line by the CLI."""


class NotImplementedStage(UserError):
    """A pipeline stage that this version of the framework does not provide yet."""

    def __init__(self, stage: str):
        super().__init__(f"not implemented yet: {stage}")
        self.stage = stage
