"""The divergence guard: decides, before each meta-update, whether the meta-batch diverged.

Built by the builder and handed to the Upper problem in its config (``UpperConfig``), which
asks ``allow_update`` before every meta-update; the engine tells it where each inner loop's
tasks start and asks it to ``check`` the inner loops that do not end in the meta-update. A
diverged meta-batch is skipped (``--on-divergence skip``) or stops the run: ``allow_update``
raises ``Diverged``, which the engine turns into a checkpoint of the last good state and a
``RunStopped`` (exit 3).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from engines import distributed
from imaml.config import RunConfig
from imaml.errors import RunStopped
from imaml.metrics import global_norm

__all__ = ["DivergenceGuard", "PretrainDivergenceGuard", "Diverged"]


class Diverged(RunStopped):
    """A meta-batch diverged and the run stops (``--on-divergence stop``, exit 3); θ is not
    updated. The engine's loop adds where the last good state was saved."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=3)


class DivergenceGuard:
    """Finds the first task of a meta-batch whose adaptation diverged: a non-finite inner loss,
    adapted weights beyond ``--divergence-factor`` × ‖θ‖, a non-finite query loss, or a
    non-finite meta-gradient. Every process decides alike (the first divergence over all)."""

    def __init__(self, config: RunConfig, say: Callable[[str], None] = lambda line: None):
        self.config = config
        self.say = say
        self.skipped = 0  # meta-batches skipped so far
        self.divergence: Optional[tuple] = None  # (task index, what diverged) in this meta-batch
        self.first_task = 0  # index in the meta-batch of the current inner loop's first task
        self.theta_norm = 1.0
        self.step = 0  # the meta-step being taken

    def start_meta_batch(self, upper, step: int) -> None:
        """Forget the last meta-batch; measure ‖θ‖, which adapted weights are compared with."""
        self.step = step
        self.divergence = None
        self.first_task = 0
        self.theta_norm = max(float(global_norm(upper.trainable_parameters())), 1e-12)

    def adapting(self, first_task: int) -> None:
        """The next inner loop adapts the tasks starting at ``first_task`` of the meta-batch."""
        self.first_task = first_task

    def check(self, lower, upper) -> None:
        """Note the first task of the inner loop just run that diverged, if any."""
        self._note(self.diverged(lower, upper))

    def diverged(self, lower, upper) -> Optional[tuple]:
        """(index in the meta-batch, what) of the first diverged task of the last inner loop."""
        losses = lower.inner_losses
        if not all(math.isfinite(v) for v in losses):
            return self.first_task, f"the inner-loop loss became {next(v for v in losses if not math.isfinite(v))}"
        ratios = lower.adapted_norms() / self.theta_norm  # [T]
        over = ~(ratios <= self.config.divergence_factor)  # NaN counts as over
        if bool(over.any()):
            first = int(over.nonzero()[0])
            return self.first_task + first, f"the adapted weights grew to {float(ratios[first]):.3g}× the norm of θ"
        for stats in upper.task_stats[-lower.num_tasks:]:
            if not torch.isfinite(stats[0]):
                return self.first_task, f"the query loss is {stats[0].item()}"
        return None

    def _note(self, divergence: Optional[tuple]) -> None:
        if divergence and self.divergence is None:
            self.divergence = divergence

    def allow_update(self, upper, meta_grad_norm) -> bool:
        """Asked by the Upper problem before each meta-update: False skips it; raises
        ``Diverged`` when the run should stop."""
        self.check(upper.task_problem, upper)  # the meta-batch's last inner loop, run just now
        if meta_grad_norm is not None and not math.isfinite(float(meta_grad_norm)):
            self._note((self.first_task, "the meta-gradient is not finite"))
        if distributed.max_over_ranks(self.divergence is not None):  # every process decides alike
            self.divergence = min(d for d in distributed.gather_objects(self.divergence) if d)
        if self.divergence is None:
            return True
        index, what = self.divergence
        cfg = self.config
        message = (f"diverged at meta-step {self.step}, task {index} of the meta-batch: {what}. "
                   f"Likely cause: an inner learning rate too large for this model (--inner-lr {cfg.inner_lr})"
                   + (f" or a proximal term too weak to hold the inner loop (--lam {cfg.lam})" if cfg.algo == "imaml" else "")
                   + "; lower it, or pass --on-divergence skip")
        if cfg.on_divergence == "skip":
            self.skipped += 1
            self.say(f"warning: {message} (meta-batch skipped)")
            return False
        raise Diverged(message)


class PretrainDivergenceGuard(DivergenceGuard):
    """The baseline's guard: a supervised step diverged if its training loss is not finite."""

    def diverged(self, lower, upper) -> Optional[tuple]:
        if upper.task_stats and not torch.isfinite(upper.task_stats[-1][0]):
            return self.first_task, f"the training loss is {upper.task_stats[-1][0].item()}"
        return None
