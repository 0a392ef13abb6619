"""Checkpoints and stop signals: how a run is saved, and stopped without losing it.

``engine_state`` is what a checkpoint holds of an engine (``restore_engine_state`` puts it back);
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

import torch

from engines import distributed
from imaml import checkpoint
from imaml.errors import RunStopped

__all__ = ["RunControl", "engine_state", "restore_engine_state"]


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

    def stop_if_signalled(self, save, step: int, output_dir: str) -> None:
        """After a SIGTERM/SIGINT (to any process of a job): ``save()`` the checkpoint, then stop
        with a clear message (``RunStopped``, exit 128 + the signal)."""
        signum = self.signalled()
        if signum is None:
            return
        where = save()
        hint = f"; checkpoint {where}, continue with --resume {output_dir}" if where else ""
        raise RunStopped(f"{signum.name} after meta-step {step}{hint}", exit_code=128 + signum)


def engine_state(engine, step: Optional[int] = None) -> dict:
    """Everything a resumed run of ``engine`` needs to continue exactly as an uninterrupted one
    (``step``: the meta-step to record, if not the current one)."""
    return {
        "step": engine.global_step if step is None else step,
        "config": engine.run_config.to_dict(),
        "upper": engine.upper.state_dict(),
        "env": engine.env.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "tasks_seen": engine.tasks_seen,
        "train_seconds": engine.train_seconds,
        "before_meta_training": engine.before,
        "best_validation": engine.best,
        "validation": engine.last_validation,
        "test_also_at": engine.test_also,
        "skipped_meta_batches": engine.guard.skipped,
        "meta_gradient_health": engine.records.health.state_dict(),
        "lr_schedule": engine.upper.lr_schedule.state_dict() if engine.upper.lr_schedule else None,
    }


def restore_engine_state(engine, state: dict) -> None:
    """Put ``engine`` back in the state ``engine_state`` recorded."""
    engine.global_step = state["step"]
    engine.upper.load_state_dict(state["upper"])
    engine.env.load_state_dict(state["env"])
    torch.set_rng_state(state["torch_rng"])
    engine.tasks_seen = state["tasks_seen"]
    engine.train_seconds = state["train_seconds"]
    engine.before = state["before_meta_training"]
    engine.best = state["best_validation"]
    engine.last_validation = state["validation"]
    engine.test_also = state.get("test_also_at")  # a checkpoint from before --test-also-at: none
    engine.guard.skipped = state.get("skipped_meta_batches", 0)
    engine.records.health.load_state_dict(state.get("meta_gradient_health"))
    if engine.upper.lr_schedule is not None and state.get("lr_schedule"):
        engine.upper.lr_schedule.load_state_dict(state["lr_schedule"])
