"""Checkpoints and stop signals: how a run is saved, and stopped without losing it.

``RunControl`` writes ``<output-dir>/checkpoints/<name>.pt`` (none without a checkpoint folder:
library use, tests), catches SIGTERM/SIGINT while a run is in progress (``watching``) and says,
at the points where every process of a job looks (``signalled``), whether any of them got one.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Optional

from engines import distributed
from imaml import checkpoint

__all__ = ["RunControl"]


class RunControl:
    """The checkpoint folder of a run and the stop signals it has received."""

    def __init__(self, checkpoint_dir: Optional[Path] = None):
        self.checkpoint_dir = checkpoint_dir  # None: no checkpoints
        self._signal: Optional[int] = None

    def save(self, name: str, state: dict) -> Optional[Path]:
        """Write checkpoint ``name`` (atomically); its path, or None without a checkpoint folder."""
        if self.checkpoint_dir is None:
            return None
        path = self.checkpoint_dir / f"{name}.pt"
        checkpoint.save(path, state)
        return path

    @contextlib.contextmanager
    def watching(self):
        """SIGTERM and SIGINT are noted (a second one stops at once) while inside; the
        previous handlers come back after. Only the main thread can install handlers."""
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        if self._signal is not None:
            raise KeyboardInterrupt  # a second signal: stop at once
        self._signal = signum

    def signalled(self) -> Optional[signal.Signals]:
        """The signal any process of the job got, or None (every process gets the same answer)."""
        signum = int(distributed.max_over_ranks(self._signal or 0))
        return signal.Signals(signum) if signum else None
