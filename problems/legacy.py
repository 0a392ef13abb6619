"""The one line an earlier built-in import path prints, naming the settings that replace it."""

from __future__ import annotations

import sys

__all__ = ["say_replaced"]

_said: set = set()


def say_replaced(path: str, flags: str) -> None:
    """Once per process: ``path`` still runs, and ``flags`` is how to ask for it now."""
    if path not in _said:
        _said.add(path)
        print(f"note: --lower-problem {path} is the setting {flags} (same algorithm); use the flags instead",
              file=sys.stderr)
