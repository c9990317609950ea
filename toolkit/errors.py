"""User-facing errors: the CLI prints them as one line and exits with code 1."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A problem with the user's input (file, flag, model); never a bug in the toolkit."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)
