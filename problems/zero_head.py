"""A zero-initialized classifier head, reset to zero before every task.

With the head zero at the start of every task, every class starts from the same logit, so
the meta-learned θ (the encoder) does not depend on how many classes there are or how they
are labelled; meta-training at ``--ways 5`` and meta-testing at ``--test-ways 20`` then
uses the same θ (the "zeroing trick" of Kao et al., 2022, "MAML is a noisy contrastive learner"). The head is
created per task with as many outputs as the task has classes (from its labels; for
regression, the model's output size), adapted in the inner loop, and discarded.

The θ model keeps its head as a placeholder, zeroed when the run starts; it never gets a
meta-gradient, so it stays zero. Select with
``--lower-problem problems.zero_head:ZeroHeadUnrolled`` (``--algo maml``/``fomaml``) or
``problems.zero_head:ZeroHeadImplicit`` (``--algo imaml``, where the proximal term pulls
the head towards its zero start: λ/2·(‖φ_enc − θ_enc‖² + ‖φ_h‖²)), or
``problems.zero_head:ZeroHeadANILImplicit`` (``--algo imaml``, the head alone adapted: see its
docstring for why its inner problem is convex). Why a Lower problem and
not a model wrapper: resetting per task and sizing to the task are adaptation rules, and
the Lower problem is where a task's adaptation starts; any model whose output layer is one
``nn.Linear`` works unchanged.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from imaml.errors import UsageError
from problems.anil import ANILImplicit
from problems.head import find_head, head_names
from problems.lower import ImplicitLower, UnrolledLower

__all__ = ["ZeroHeadUnrolled", "ZeroHeadImplicit", "ZeroHeadANILImplicit"]


class _ZeroHead:
    """What both variants share: which parameters are the head, its size for a task, and
    zeroing θ's placeholder head at the start of the run."""

    variable_ways = True

    def _find_zero_head(self) -> None:
        name, layer = find_head(self.module)
        if not isinstance(layer, nn.Linear):
            raise UsageError(f"the zero-initialized head needs an output layer that is one nn.Linear; "
                             f"{type(self.module).__name__}.{name} is a {type(layer).__name__}")
        self._head = set(head_names(self.module))

    def initialize(self, engine_config) -> None:
        super().initialize(engine_config)
        with torch.no_grad():
            for name, theta in self.meta_problem.module.named_parameters():
                if name in self._head:
                    theta.zero_()

    def task_ways(self) -> int:
        """Outputs the current task needs: its number of classes (labels are 0..N−1, every
        class in the support set), or the model's output size for regression."""
        if self.env.kind == "classification":
            return int(self.env.current.support_y.max()) + 1
        return find_head(self.meta_problem.module)[1].out_features

    def zero_head_like(self, like: torch.Tensor, ways: int) -> torch.Tensor:
        """Zeros shaped like a head parameter, with ``ways`` outputs (rows)."""
        shape: Tuple[int, ...] = (ways, *like.shape[1:])
        return torch.zeros(shape, dtype=like.dtype, device=like.device)


class ZeroHeadUnrolled(_ZeroHead, UnrolledLower):
    """Unrolled MAML / FOMAML from (θ_enc, zero head)."""

    def patch_modules(self) -> None:
        super().patch_modules()
        self._find_zero_head()

    def on_inner_loop_start(self) -> None:
        super().on_inner_loop_start()
        ways = self.task_ways()
        self.params = tuple(self.zero_head_like(p, ways).requires_grad_() if name in self._head else p
                            for name, p in zip(self._param_names, self.params))


class ZeroHeadImplicit(_ZeroHead, ImplicitLower):
    """iMAML from (θ_enc, zero head), the proximal term anchored at that start."""

    def __init__(self, name, config, module, optimizer, device=None):
        super().__init__(name, config, module, optimizer, device=device)
        self._find_zero_head()

    def on_inner_loop_start(self) -> None:
        ways = self.task_ways()
        with torch.no_grad():
            for (name, phi), theta in zip(self.module.named_parameters(), self.meta_problem.module.parameters()):
                if name in self._head:
                    phi.data = self.zero_head_like(theta, ways)  # resized in place: the optimizer keeps it
                else:
                    phi.copy_(theta)
            for mine, theirs in zip(self.module.buffers(), self.meta_problem.module.buffers()):
                mine.copy_(theirs)
        self.optimizer.state.clear()

    def regularizer(self) -> torch.Tensor:
        """λ/2·‖φ − φ₀‖² with φ₀ = (θ_enc, 0)."""
        anchored = zip(self.module.named_parameters(), self.meta_problem.initial_parameters())
        return 0.5 * self.config.lam * sum((phi if name in self._head else phi - theta).pow(2).sum()
                                           for (name, phi), theta in anchored)


class ZeroHeadANILImplicit(ZeroHeadImplicit, ANILImplicit):
    """iMAML over the head alone, from zero, on θ's encoder (ANIL's split with the zero head):
    g(φ_h; θ) = L_support(φ_h; θ_enc) + λ/2·‖φ_h‖², a ridge-regularized softmax regression on
    θ's features. Cross-entropy is convex in a linear layer's weights, so g is λ-strongly convex
    whatever the encoder or activation: A = H_h + λI ⪰ λI, the minimizer is unique, Newton-type
    inner steps reach it in a few iterations and the solve is well posed (the implicit function
    theorem's assumptions hold by construction). Meta-gradient: the encoder's direct effect on
    the query loss plus the implicit term through the head (``problems.anil``); the zero
    start and sizing per task are the zero head's."""

    def regularizer(self) -> torch.Tensor:
        """λ/2·‖φ_h‖²: the proximal term towards the head's zero start."""
        return 0.5 * self.config.lam * sum(p.pow(2).sum() for p in self.trainable_parameters())
