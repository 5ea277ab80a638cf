"""What the library raises, and the CLI's exit code for each.

- 0: done.
- 1: the job ran but its result failed a check (a merge probe beyond tolerance: `CheckFailed`; a non-finite loss:
  `TrainingDiverged`; a run that changed nothing), or an unexpected error.
- 2: bad input, a file, option or value that cannot work, named in the message (`LorakitError`).
- 130: interrupted by Ctrl-C (SIGINT) after saving a checkpoint (`TrainingInterrupted`).
- 143: stopped by SIGTERM (what schedulers send) after saving a checkpoint (`TrainingInterrupted`).

Stops are not errors of the input: `TrainingInterrupted` is a `KeyboardInterrupt` and `TrainingDiverged` a
`RuntimeError`, so code that catches `ValueError` (or `Exception`, for a Ctrl-C) around `lorakit.train(...)`
does not swallow them.
"""

from __future__ import annotations

from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_CHECK_FAILED = 1


class LorakitError(ValueError):
    """A problem with the user's input: printed by the CLI as one `error: ...` line.

    Args:
        message: what is wrong, naming the file, line or value and what was expected.
        exit_code: the CLI's exit status (2 for bad input).
    """

    def __init__(self, message: str, exit_code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class CheckFailed(LorakitError):
    """A result that failed its check (e.g. merged logits beyond the tolerance); nothing was written. Exit 1."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=EXIT_CHECK_FAILED)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C or SIGTERM after saving a checkpoint; `--resume` continues it.

    Attributes:
        checkpoint: the checkpoint folder that was saved.
        exit_code: 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str, checkpoint: Path | None, signum: int) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.exit_code = 128 + signum


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept. Exit 1.

    Attributes:
        checkpoint: the last good checkpoint folder, or None if none was saved yet.
    """

    exit_code = EXIT_CHECK_FAILED

    def __init__(self, message: str, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


class Note(UserWarning):
    """Something the user should know that does not stop the command (printed by the CLI as `note: ...`)."""
