"""The Upper (meta) problem: the initialization θ, scored by the adapted model's query loss."""

from __future__ import annotations

from typing import List, Optional

import torch
from betty.problems import ImplicitProblem

from imaml.metrics import global_norm, task_loss, task_losses, task_score, task_scores

__all__ = ["MetaInit"]


class MetaInit(ImplicitProblem):
    """Holds θ. Its loss for a task is the query loss of the Lower problem after adaptation;
    Betty averages it over the meta-batch (``gradient_accumulation`` = tasks per meta-batch,
    or this process's share of them when sharded) and takes one optimizer step per meta-batch.

    ``task_stats`` collects (query loss, query score) per task for the engine's logs, and
    ``meta_grad_norm`` the norm of the averaged meta-gradient at the last meta-update.

    Hooks an extension overrides (``--upper-problem module:Class``; call ``super()``):

    - ``training_step(batch) -> Tensor``: the meta-objective of one task (default: the query
      loss of the adapted Lower problem); keep appending to ``task_stats``.
    - ``initial_parameters() -> list``: θ, what each task's adaptation starts from (the
      model's parameters).
    - ``trainable_parameters() -> list``: everything meta-learned: θ plus any extra
      meta-parameters (Meta-SGD's learning rates). Extras must also be given to
      ``self.optimizer`` (``add_param_group``) and saved by ``state_dict``/``load_state_dict``.

    Leave alone: ``__init__``'s signature (the builder calls it as here), ``optimizer_step``
    (the engine's divergence guard), ``drain_task_stats``, ``get_batch``, ``step``.
    """

    def __init__(self, name, config, module, optimizer, scheduler=None, device=None):
        super().__init__(name, config, module=module, optimizer=optimizer, scheduler=scheduler,
                         device=device)
        self.task_stats: list = []
        self.meta_grad_norm = None
        # called before each meta-update with the meta-gradient norm; False skips the update
        self.update_guard = None
        # the meta learning-rate schedule, stepped once per meta-step by the engine (Betty's
        # own ``scheduler`` would step once per task)
        self.lr_schedule: Optional[torch.optim.lr_scheduler.LRScheduler] = None
        # called with the parameters before anything reads their gradients: the all-reduce
        # that makes them the mean over all processes' tasks (engines/distributed.py)
        self.gradient_sync = None

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
        output = self.task_problem.predict(x)
        if getattr(self.task_problem, "vectorized", False):  # all tasks at once: [T, B, ...]
            losses = task_losses(self.env.kind, output, y)
            scores = task_scores(self.env.kind, output.detach(), y)
            self.task_stats.extend(torch.stack([losses.detach(), scores], dim=1).unbind(0))
            return losses.mean()  # the meta-batch mean, as gradient accumulation gives per task
        loss = task_loss(self.env.kind, output, y)
        self.task_stats.append(torch.stack([loss.detach(), task_score(self.env.kind, output.detach(), y)]))
        return loss

    def optimizer_step(self, *args, **kwargs):
        if self.gradient_sync is not None:
            self.gradient_sync(self.trainable_parameters())
        self.meta_grad_norm = global_norm([p.grad for p in self.trainable_parameters()])
        if self.update_guard is not None and not self.update_guard(self.meta_grad_norm):
            return  # θ and the optimizer state stay as they were; Betty clears the gradients
        super().optimizer_step(*args, **kwargs)

    def drain_task_stats(self) -> torch.Tensor:
        """[tasks, 2] (query loss, query score) since the last call."""
        stats, self.task_stats = self.task_stats, []
        return torch.stack(stats) if stats else torch.empty(0, 2)
