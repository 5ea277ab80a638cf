"""The one error type the library raises for bad input."""

from __future__ import annotations


class LorakitError(ValueError):
    """A problem with the user's input: printed by the CLI as one `error: ...` line.

    Args:
        message: what is wrong, naming the file, line or value and what was expected.
        exit_code: the CLI's exit status (2 for bad input, 1 for a failed check).
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
