"""The Upper (meta) problem: the initialization θ, scored by the adapted model's query loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from betty.configs import Config
from betty.problems import ImplicitProblem

from imaml.metrics import global_norm

__all__ = ["MetaInit", "UpperConfig"]


@dataclass
class UpperConfig(Config):
    """Betty's problem ``Config`` plus the two things the builder hands the Upper problem:

    - ``divergence_guard``: asked before each meta-update (``allow_update(upper,
      meta_grad_norm) -> bool``; False skips the update), e.g. ``engines.divergence``'s;
    - ``gradient_sync``: called with the parameters before anything reads their gradients:
      the all-reduce that makes them the mean over all processes' tasks (engines/distributed.py).
    """

    divergence_guard: Optional[object] = None
    gradient_sync: Optional[Callable] = None


class MetaInit(ImplicitProblem):
    """Holds θ. Its loss for an inner loop's tasks is their mean query loss after adaptation;
    Betty averages it over the meta-batch (``gradient_accumulation`` = inner loops per
    meta-batch: its tasks, or this process's share of them, one at a time; 1 when they are
    adapted at once) and takes one optimizer step per meta-batch.

    ``task_stats`` collects (query loss, query score) per task for the engine's logs, and
    ``meta_grad_norm`` the norm of the averaged meta-gradient at the last meta-update.

    Hooks an extension overrides (``--upper-problem module:Class``; call ``super()``):

    - ``training_step(batch) -> Tensor``: the meta-objective of the inner loop's tasks
      (default: the mean query loss of the adapted Lower problem); keep appending to
      ``task_stats``.
    - ``initial_parameters() -> list``: θ, what each task's adaptation starts from (the
      model's parameters).
    - ``trainable_parameters() -> list``: everything meta-learned: θ plus any extra
      meta-parameters (Meta-SGD's learning rates). Extras must also be given to
      ``self.optimizer`` (``add_param_group``) and saved by ``state_dict``/``load_state_dict``.

    Leave alone: ``__init__``'s signature (the builder calls it as here), ``optimizer_step``
    (the divergence guard), ``drain_task_stats``, ``get_batch``, ``step``.
    """

    def __init__(self, name, config, module, optimizer, scheduler=None, device=None):
        super().__init__(name, config, module=module, optimizer=optimizer, scheduler=scheduler,
                         device=device)
        self.task_stats: list = []
        self.meta_grad_norm = None
        self.divergence_guard = getattr(config, "divergence_guard", None)  # a plain Betty Config has none
        self.gradient_sync = getattr(config, "gradient_sync", None)
        # the meta learning-rate schedule, stepped once per meta-step by the engine (Betty's
        # own ``scheduler`` would step once per task)
        self.lr_schedule: Optional[torch.optim.lr_scheduler.LRScheduler] = None

    @property
    def task_problem(self):
        """The Lower problem (Betty's child in the dependency graph)."""
        return self.children[0]

    def get_batch(self):
        return self.env.query

    def initial_parameters(self) -> List[torch.Tensor]:
        """θ: the parameters every task's adaptation starts from."""
        return list(self.module.parameters())

    def training_step(self, batch) -> torch.Tensor:
        x, y = batch
        lower = self.task_problem
        output = lower.predict(x)
        losses = lower.task_losses(output, y)  # [T]
        scores = lower.task_scores(output.detach(), y)
        self.task_stats.extend(torch.stack([losses.detach(), scores], dim=1).unbind(0))
        return losses.mean()  # the mean over the inner loop's tasks, as gradient accumulation gives per task

    def optimizer_step(self, *args, **kwargs):
        if self.gradient_sync is not None:
            self.gradient_sync(self.trainable_parameters())
        self.meta_grad_norm = global_norm([p.grad for p in self.trainable_parameters()])
        guard = self.divergence_guard
        if guard is not None and not guard.allow_update(self, self.meta_grad_norm):
            return  # θ and the optimizer state stay as they were; Betty clears the gradients
        super().optimizer_step(*args, **kwargs)

    def drain_task_stats(self) -> torch.Tensor:
        """[tasks, 2] (query loss, query score) since the last call."""
        stats, self.task_stats = self.task_stats, []
        return torch.stack(stats) if stats else torch.empty(0, 2)
