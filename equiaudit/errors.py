"""User-facing exceptions. Each carries a one-line, actionable message.

The CLI maps :class:`ConfigError` to exit code 2 and per-checkpoint failures
(:class:`CheckpointError`, :class:`ModelOutputError`) to a ``status`` in the CSV.
"""

from __future__ import annotations


class EquiauditError(Exception):
    """Base class; ``status`` is the short code written to ``summary.csv``."""

    status = "error"

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class ConfigError(EquiauditError):
    """A bad config key/value or command-line option (exit code 2)."""

    status = "bad_config"


class DataError(EquiauditError):
    """A dataset that cannot be read or lacks a mapped key (exit code 2: nothing to audit)."""

    status = "bad_data"


class CheckpointError(EquiauditError):
    """A checkpoint that cannot be read safely or does not fit the model (that checkpoint fails)."""

    status = "bad_checkpoint"


class ModelOutputError(EquiauditError):
    """The model returned NaN/inf or a wrongly shaped output (that checkpoint fails)."""

    status = "bad_output"


class DataWarning(UserWarning):
    """Something about the data the user must hear, though the audit goes on (the CLI shows
    it as one ``warning:`` line): e.g. an HDF5 file followed outside its folder on request."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (library messages can run to
    paragraphs), or the exception's type name when it has none."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
