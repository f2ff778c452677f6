"""The one error type for user-facing problems."""
from __future__ import annotations


class AuditkitError(Exception):
    """Bad input: what is wrong and where (file, row, key path). The CLI prints it as one line, exit 2."""

    def __init__(self, message: str, where: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class AuditkitWarning(UserWarning):
    """Something the user should know that does not stop the run (e.g. a cache that could not be written)."""
