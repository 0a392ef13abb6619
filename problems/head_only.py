"""``--adapt head``: the inner loop adapts the output layer alone, on features θ's encoder
computes once per inner loop (ANIL's split: Raghu et al., 2020).

The encoder (every parameter but the output layer, ``problems.head``) is θ's own. It runs once
per task and inner loop on the support set and once on the query set, not at every inner step
and line-search trial; in meta-training its features keep their graph to θ, so the meta-gradient
reaches the encoder through one backward pass. The head starts at θ's head or at zero
(``--head-init``, ``problems.adaptation.head_start``) and its parameters always carry a task
dimension, [T, ways, F] and [T, ways]: one task at a time is T = 1, a whole meta-batch T = B,
the same code (``tasks_at_once``, set by the builder).

- ``HeadUnrolled`` (``--algo maml|fomaml``): differentiable SGD on the head; the meta-gradient
  is autograd through the head's steps, whose gradients depend on the encoder's features, plus
  the encoder's direct effect on the query loss.
- ``HeadImplicit`` (``--algo imaml``): g(φ_h; θ) = L_support(φ_h; θ_enc) + λ/2·‖φ_h − φ₀‖²,
  φ₀ = θ_h or 0. The meta-gradient is the exact total derivative of L_query(φ_h*(θ); θ_enc):
  the direct ∂L_query/∂θ_enc plus −(∂²g/∂θ∂φ_h)(∂²g/∂φ_h²)⁻¹∇φ_h L_query, whose encoder part
  flows through the features. With a zero start, g is λ-strongly convex whatever the encoder
  (cross-entropy is convex in a linear layer), so its minimizer is unique and the solve well
  posed; ``--hypergrad exact`` then solves the head's system in closed form
  (``problems.head_solve``).
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn
from torch.func import functional_call

from imaml.errors import UsageError
from imaml.metrics import stacked_losses, stacked_scores
from imaml.vectorize import stack_for_tasks
from problems.adaptation import head_start
from problems.head import find_head
from problems.head_solve import solve_head_system
from problems.lower import ImplicitLower, UnrolledLower

__all__ = ["HeadOnFeatures", "HeadImplicit", "HeadUnrolled"]


class HeadOnFeatures:
    """What both skins share: the encoder's features, cached per inner loop, and the head
    applied to them for T tasks at once."""

    def setup_head(self) -> None:
        name, layer = find_head(self.module)
        if not isinstance(layer, nn.Linear):
            raise UsageError(f"--adapt head needs an output layer that is one nn.Linear; "
                             f"{type(self.module).__name__}.{name} is a {type(layer).__name__}")
        self.param_names = [n for n, _ in self.module.named_parameters()]
        self.head_index = [i for i, n in enumerate(self.param_names) if n.startswith(name + ".")]
        self.has_bias = layer.bias is not None
        self._captured: List[torch.Tensor] = []
        layer.register_forward_pre_hook(lambda module, inputs: self._captured.append(inputs[0]))
        self._features: list = []  # (input tensor, its features [T, B, F]) of this inner loop

    # ------------------------------------------------------------------ features
    def encoder_state(self, task: int, support: bool) -> dict:
        """The tensors the encoder runs with for task ``task`` (on its support set or not): θ
        (per-task views of it where the skin wants per-task meta-gradients), plus buffers if the
        skin keeps its own."""
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[T, B, F]: the head's input for examples ``x`` ([B, ...], or [T, B, ...] stacked),
        computed once per inner loop and input tensor."""
        for seen, feats in self._features:
            if seen is x:
                return feats
        rows, support = [], x is self.env.current.support_x
        for t, x_t in enumerate(x if self.stacked else x.unsqueeze(0)):
            self._captured.clear()
            functional_call(self.module, self.encoder_state(t, support), (x_t,))
            rows.append(self._captured[-1])
        self._captured.clear()
        feats = torch.stack(rows)
        self._features.append((x, feats))
        return feats

    def forget_features(self) -> None:
        self._features = []

    def head_forward(self, head: List[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The head's outputs [T, B, outputs] (unstacked: [B, outputs]) on ``x``'s features."""
        feats = self.features(x)
        if not getattr(self, "feature_graph", True):
            feats = feats.detach()
        weight = head[0].transpose(1, 2)
        out = torch.baddbmm(head[1].unsqueeze(1), feats, weight) if self.has_bias else torch.bmm(feats, weight)
        return out if self.stacked else out[0]

    # ------------------------------------------------------------------ per-task numbers
    def _stacked_pair(self, output, target):
        return (output, target) if self.stacked else (output.unsqueeze(0), target.unsqueeze(0))

    def support_loss(self, x, y):
        return self.task_losses(self(x), y).sum()

    def task_losses(self, output, target):
        return stacked_losses(self.env.kind, *self._stacked_pair(output, target))

    def task_scores(self, output, target):
        return stacked_scores(self.env.kind, *self._stacked_pair(output, target))

    def adapted_norms(self) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([p.reshape(self.num_tasks, -1).norm(dim=1)
                                for p in self.trainable_parameters()]).norm(dim=0)

    def theta_head(self, theta: List[torch.Tensor]) -> List[torch.Tensor]:
        return [theta[i] for i in self.head_index]


class HeadImplicit(HeadOnFeatures, ImplicitLower):
    """iMAML over the head: φ is ``self.phi`` ([T, ways, F] and [T, ways]); the inner steps see
    the features without their graph, the hypergradient and the query loss with it."""

    def __init__(self, name, config, module, optimizer, device=None):
        super().__init__(name, config, module, optimizer, device=device)
        self.setup_head()  # φ is self.phi, as in ImplicitLower's stacked mode, always with a task dimension
        self.feature_graph = True

    def trainable_parameters(self):
        return self.phi

    def parameters(self):
        return self.phi

    def forward(self, x):
        return self.head_forward(self.phi, x)

    def encoder_state(self, task: int, support: bool) -> dict:
        """θ; in meta-training θ itself for the queries (their direct term needs no split by
        task) and per-task views for the support set (the solve's cross term, task by task)."""
        theta = self.meta_problem.initial_parameters()
        if self.task_meta_parameters is None or not support:
            return dict(zip(self.param_names, theta if self.in_training else (t.detach() for t in theta)))
        if self._task_rows is None:  # one unbind per inner loop: its backward stacks the T rows at once
            self._task_rows = [t.unbind(0) for t in self.task_meta_parameters]
        return {name: rows[task] for name, rows in zip(self.param_names, self._task_rows)}

    def one_step_descent(self, batch=None):
        """An inner step needs no graph to θ: the features go in detached."""
        self.feature_graph = False
        try:
            return super().one_step_descent(batch)
        finally:
            self.feature_graph = True

    def anchor(self) -> List[torch.Tensor]:
        """φ₀ per task: θ's head (its per-task views in meta-training, so the cross term
        reaches it) or zeros."""
        if self.head_init == "zero":
            return [torch.zeros_like(p) for p in self.phi]
        theta = self.task_meta_parameters
        if theta is None:
            return stack_for_tasks(self.theta_head([t.detach() for t in self.meta_problem.initial_parameters()]),
                                   self.num_tasks)
        return self.theta_head(theta)

    def task_objectives(self, batch) -> torch.Tensor:
        return self.stacked_objectives(batch)

    def on_inner_loop_start(self) -> None:
        tasks = self.count_tasks()
        self.forget_features()
        with torch.no_grad():
            for mine, theirs in zip(self.module.buffers(), self.meta_problem.module.buffers()):
                mine.copy_(theirs)
        theta = self.meta_problem.trainable_parameters()
        self.task_meta_parameters = stack_for_tasks(theta, tasks) if self.in_training else None
        self._task_rows = None
        start = head_start(self.theta_head([t.detach() for t in theta]), self.head_init, self.task_ways(), tasks)
        self.phi = [p.clone().requires_grad_() for p in start]
        self.optimizer.param_groups[0]["params"] = self.phi
        self.optimizer.state.clear()

    def solve_exactly(self, b: torch.Tensor) -> torch.Tensor:
        """A⁻¹b per task for A = ∂²g/∂φ_h² in closed form (``--hypergrad exact``)."""
        return solve_head_system(self.features(self.env.support[0]).detach(), self.phi, self.env.kind,
                                 self.config.lam + self.config.weight_decay, b)


class HeadUnrolled(HeadOnFeatures, UnrolledLower):
    """Unrolled MAML / FOMAML over the head: the head entries of ``self.params`` are [T, ...]
    tensors that take the inner steps; the encoder entries are θ's and unused."""

    def patch_modules(self) -> None:
        super().patch_modules()
        self.setup_head()

    def trainable_parameters(self) -> List[torch.Tensor]:
        return [self.params[i] for i in self.head_index]

    def forward(self, x):
        return self.head_forward(self.trainable_parameters(), x)

    def encoder_state(self, task: int, support: bool) -> dict:
        theta = self.meta_problem.initial_parameters()
        if not self.in_training:
            theta = [t.detach() for t in theta]
        state = dict(zip(self.param_names, theta))
        state.update(zip(self._buffer_names, self.buffers))  # BatchNorm's running statistics, this loop's
        return state

    def step_reads(self) -> List[torch.Tensor]:
        """The support features: the steps read θ's encoder only through them (θ's head only
        through the carried start), so a recomputed step differentiates into them and stops."""
        return [feats for _, feats in self._features]

    def on_inner_loop_start(self) -> None:
        tasks = self.count_tasks()
        self.forget_features()
        theta = self.meta_problem.initial_parameters()
        start = head_start(self.theta_head(theta), self.head_init, self.task_ways(), tasks)
        if self.in_training:  # graph-connected to θ's head (a zero start has none)
            start = [s.clone() if s.requires_grad else s.requires_grad_() for s in start]
        else:
            start = [s.detach().clone().requires_grad_() for s in start]
        params = [t.detach() for t in theta]  # the encoder's entries: unused, and never stepped
        for i, s in zip(self.head_index, start):
            params[i] = s
        self.params = tuple(params)
        self.buffers = tuple(b.clone() for b in self.meta_problem.module.buffers())
        for state in self.optimizer.state:
            state.clear()
        self.features(self.env.support[0])  # now, so a recomputed step reads the same tensor
