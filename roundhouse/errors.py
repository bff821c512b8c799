"""User-facing errors.

Every mistake a user can make (a bad job file, bad data, a missing checkpoint) raises a
`RoundhouseError`. The CLI prints it as one line, `error: <what> (<how to fix>)`, and exits 2.
Bugs in roundhouse itself raise anything else and keep their traceback.
"""

from __future__ import annotations


class RoundhouseError(Exception):
    """An error the user can fix. `what` says what is wrong, `fix` how to fix it."""

    def __init__(self, what: str, fix: str | None = None) -> None:
        self.what = what
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """`what (fix)`: the text the CLI prints after `error: `."""
        return f"{self.what} ({self.fix})" if self.fix else self.what


class JobFileError(RoundhouseError):
    """The job file (or an override) is missing, unreadable or invalid."""


class ModelError(RoundhouseError):
    """An unknown model or flavor, or a model that cannot take the given input."""


class DataError(RoundhouseError):
    """An unknown data source or data that does not fit the job."""


class StorageError(RoundhouseError):
    """The storage path cannot be written or read."""


class CheckpointError(RoundhouseError):
    """No checkpoint to resume from, or one that does not fit this job."""


class TrainingError(RoundhouseError):
    """Training cannot go on (for example a NaN or infinite loss)."""
