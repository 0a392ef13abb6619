"""Meta-SGD (Li et al., 2017): a learned learning rate for every parameter entry.

The inner update is φ ← φ − α ⊙ ∇φ L_support, with α a tensor of θ's shape per parameter,
meta-learned with θ by the same optimizer (Adam at ``--meta-lr``) through the unrolled
inner loop; α starts at ``--inner-lr``. Select with
``--lower-problem problems.meta_sgd:MetaSGDLower`` (``--algo maml``, or ``fomaml`` for the
first-order variant, where α's meta-gradient treats the inner gradients as constants); the
Upper problem that holds α comes with it. Not for iMAML: the implicit meta-gradient does
not depend on the inner path, so α would get none.

α is learned for ``--inner-steps`` steps: meta-test with as many (``--test-inner-steps``;
the paper uses one step for both). More steps at the learned rates can diverge: on the
sinusoid preset after 300 meta-steps, 10 test steps give NaN where 1 step gives MSE 0.84.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from imaml.errors import UsageError
from problems.lower import UnrolledLower
from problems.upper import MetaInit

__all__ = ["MetaSGDInit", "MetaSGDLower"]


class MetaSGDInit(MetaInit):
    """θ plus ``inner_lrs`` (α, one tensor per parameter), in the meta-optimizer and in
    checkpoints."""

    def __init__(self, name, config, module, optimizer, scheduler=None, device=None):
        super().__init__(name, config, module, optimizer, scheduler=scheduler, device=device)
        self.inner_lrs = nn.ParameterList(nn.Parameter(torch.zeros_like(p.detach())) for p in module.parameters())
        self.optimizer.add_param_group({"params": list(self.inner_lrs)})  # now, before anything reads the groups

    def initialize(self, engine_config) -> None:
        super().initialize(engine_config)
        with torch.no_grad():  # the start value is the Lower problem's --inner-lr, known once linked
            for rate in self.inner_lrs:
                rate.fill_(self.task_problem.optimizer.param_groups[0]["lr"])

    def trainable_parameters(self) -> List[torch.Tensor]:
        return list(self.module.parameters()) + list(self.inner_lrs)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "inner_lrs": self.inner_lrs.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.inner_lrs.load_state_dict(state_dict["inner_lrs"])


class MetaSGDLower(UnrolledLower):
    """Unrolled inner loop with the Upper problem's per-entry learning rates."""

    upper_class = MetaSGDInit

    def __init__(self, name, config, module, optimizer, device=None):
        (group,) = optimizer.param_groups
        if group.get("momentum") or group.get("weight_decay"):
            raise UsageError("Meta-SGD's inner update is φ − α⊙∇L_support, with no momentum or weight decay: "
                             "drop --inner-momentum/--inner-weight-decay")
        super().__init__(name, config, module=module, optimizer=optimizer, device=device)

    def custom_optimizer_step(self, *args, **kwargs) -> tuple:
        lrs = self.meta_problem.inner_lrs
        if not self.in_training:
            lrs = [a.detach() for a in lrs]  # meta-test: no graph to α
        return tuple(p if p.grad is None else p - a * p.grad for p, a in zip(self.params, lrs))
