"""The one error type that names the offending file: every bad-input check raises it."""

from __future__ import annotations

from pathlib import Path


class RegistrationInputError(ValueError):
    """A user-supplied file (image, landmarks, cover table, checkpoint) cannot be used.

    Args:
        path: the file at fault, as the user gave it.
        problem: what is wrong with it, in words a user can act on.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
