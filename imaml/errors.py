"""The one exception type a user should ever see from this project."""

__all__ = ["UsageError"]


class UsageError(Exception):
    """Bad input that the user can fix: printed as one line, exit status 2, no traceback.

    The message names the problem and the fix, e.g.
    ``--ways 30: the glyphs test split has only 300 classes ... use --ways <= 300``.
    """
