"""Checkpoints that survive a kill at any moment and load without unpickling code.

``save`` writes to a temporary file in the same directory, flushes it to disk and renames it
over the target, so a reader sees the previous checkpoint or the new one, never half of one.
``load`` uses ``torch.load(weights_only=True)``: tensors, numbers, strings and containers
only; a truncated, corrupt or foreign file is a one-line UsageError.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict

import torch

from imaml.errors import UsageError

__all__ = ["save", "load", "FORMAT"]

FORMAT = "imaml-checkpoint-v1"


def save(path: str | os.PathLike, state: Dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: str | os.PathLike) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for bad files
        reason = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise UsageError(f"checkpoint {path} is truncated, corrupt or not an imaml checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UsageError(f"checkpoint {path} is not an imaml checkpoint (expected format {FORMAT})")
    return state
