"""Task-vectorized Lower problems: a whole meta-batch adapts as one Betty problem.

The lower parameters carry a leading task dimension (φ is [T, ...], row t = task t's copy,
all starting from θ), the forward pass runs every task at once with its own parameters and
its own BatchNorm statistics (``imaml.vectorize.TaskGroupedModel``), and the objective is
the *sum* of the per-task objectives. Tasks are independent, so the gradient of that sum
with respect to φ_t is task t's own gradient: every task takes exactly the SGD steps it
would take alone. The Hessian of the sum is block-diagonal, so the iMAML solvers run with
per-task scalars (``imaml.solvers``: one row per task), and the Upper problem averages the
per-task query losses, giving the same meta-gradient as the per-task path.

``tasks_at_once = None``: the engine hands these problems the whole meta-batch
(``FewShotEnv.select_all``) and runs one inner loop per meta-batch instead of one per task.
"""

from __future__ import annotations

import torch

from imaml.metrics import stacked_losses, stacked_scores
from imaml.vectorize import TaskGroupedModel, stack_for_tasks
from problems.adaptation import head_start
from problems.lower import ImplicitLower, UnrolledLower

__all__ = ["VectorizedImplicitLower", "VectorizedUnrolledLower"]


class _TaskStacked:
    """What both task-vectorized Lower problems share."""

    tasks_at_once = None  # the whole meta-batch

    def support_loss(self, x, y):
        """Σ_t L_support,t(φ_t): x is [T, B, ...]; the sum gives each φ_t its own gradient."""
        return stacked_losses(self.env.kind, self(x), y).sum()

    def task_losses(self, output, target):
        return stacked_losses(self.env.kind, output, target)

    def task_scores(self, output, target):
        return stacked_scores(self.env.kind, output, target)

    def adapted_norms(self) -> torch.Tensor:
        """‖φ_t‖ for each task t: [T]."""
        with torch.no_grad():
            rows = [p.reshape(self.num_tasks, -1).norm(dim=1) for p in self.trainable_parameters()]
            return torch.stack(rows).norm(dim=0)

    def _count_tasks(self) -> int:
        self.num_tasks = self.env.support[0].shape[0]
        return self.num_tasks

    def _start(self, stacked: list, zero_started: list) -> list:
        """φ₀ per task: θ's rows, with a zero-started head's entries at zeros ([T, ways, ...])."""
        ways = self.task_ways() if zero_started else 0
        return [head_start([t[0]], "zero", ways, len(t))[0] if i in zero_started else t
                for i, t in enumerate(stacked)]


class VectorizedImplicitLower(_TaskStacked, ImplicitLower):
    """iMAML's inner problem for T tasks at once: SGD on Σ_t L_support,t(φ_t) + λ/2·‖φ_t − θ‖²
    from φ_t = θ. ``task_meta_parameters`` are the per-task views of θ the proximal term used
    last, from which the solver reads each task's hypergradient."""

    def __init__(self, name, config, module, optimizer, device=None):
        super().__init__(name, config, module, optimizer, device=device)
        self.grouped = TaskGroupedModel(module)
        self.phi: list = []
        self.task_meta_parameters = None

    def trainable_parameters(self):
        return self.phi

    def parameters(self):
        return self.phi

    def forward(self, x):
        return self.grouped(self.phi, x)

    def task_objectives(self, batch) -> torch.Tensor:
        """g_t(φ_t) for each task, [T]: the terms whose sum ``training_step`` returns."""
        return self.stacked_objectives(batch)

    def anchor(self):
        self.task_meta_parameters = stack_for_tasks(self.meta_problem.trainable_parameters(), self.num_tasks)
        return [torch.zeros_like(self.phi[i]) if i in self._zero_started else t
                for i, t in enumerate(self.task_meta_parameters)]

    def on_inner_loop_start(self):
        tasks = self._count_tasks()
        theta = [t.detach() for t in self.meta_problem.trainable_parameters()]
        self.phi = [t.clone().requires_grad_() for t in self._start(stack_for_tasks(theta, tasks), self._zero_started)]
        self.optimizer.param_groups[0]["params"] = self.phi  # the inner SGD steps these tensors
        self.optimizer.state.clear()


class VectorizedUnrolledLower(_TaskStacked, UnrolledLower):
    """MAML's inner problem for T tasks at once: differentiable SGD steps from φ_t = θ."""

    def patch_modules(self):
        super().patch_modules()
        self.grouped = TaskGroupedModel(self.module)

    def forward(self, x):
        return self.grouped(self.params, x)

    def on_inner_loop_start(self):
        stacked = stack_for_tasks(self.meta_problem.trainable_parameters(), self._count_tasks())
        stacked = self._start(stacked, self._zero_started)
        if self.in_training:  # keeps the graph to θ (a zero start has none: a fresh leaf)
            self.params = tuple(t.clone() if t.requires_grad else t.requires_grad_() for t in stacked)
        else:
            self.params = tuple(t.detach().clone().requires_grad_() for t in stacked)
        self.buffers = ()  # vectorizable models have none
        for state in self.optimizer.state:
            state.clear()
