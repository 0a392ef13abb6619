"""The one exception type a user should ever see from this project."""

__all__ = ["UsageError", "RunStopped"]


class UsageError(Exception):
    """Bad input that the user can fix: printed as one line, exit status 2, no traceback.

    The message names the problem and the fix, e.g.
    ``--ways 30: the glyphs test split has only 300 classes ... use --ways <= 300``.
    """


class RunStopped(Exception):
    """The run stopped itself (divergence, a signal) after saving a checkpoint: one line on
    stderr and ``exit_code`` (3 for divergence, 128 + signal number for a signal)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
