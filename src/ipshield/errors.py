"""User-facing errors: one message naming the problem and the fix, never a traceback."""

from __future__ import annotations


class IPShieldError(Exception):
    """A mistake of the user (bad path, bad config, bad data). The CLI prints it without a traceback.

    ``problem`` says what is wrong, ``fix`` how to put it right.
    """

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")


class DataError(IPShieldError):
    """A dataset or image problem."""


class ConfigError(IPShieldError):
    """A configuration problem (unknown key, bad value)."""


class CheckpointError(IPShieldError):
    """A model or artifact folder that is missing files or has the wrong shapes."""
