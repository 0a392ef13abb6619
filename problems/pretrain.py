"""The conventional baseline's two roles: supervised pretraining of θ, and fine-tuning at test.

``--algo pretrain`` has no bilevel problem. ``Pretrained`` holds θ, the backbone with a head
over *all* meta-training classes, and takes plain mini-batch steps on them with the
meta-optimizer (its schedule, clipping and the engine's divergence guard included).
``FineTune`` is the Lower problem that meta-validation and meta-test run, through the same
engine loop as every meta-learner: each task starts from the pretrained encoder and a new
head fitted on the support set, then takes ``--test-inner-steps`` SGD steps (``--inner-lr``,
``--inner-momentum``, ``--inner-weight-decay``) on the support loss.

The new head is the prototype initialization (Triantafillou et al., ICLR 2020, "Proto-MAML"):
with μ_c the mean support feature of class c, W_c = 2μ_c and b_c = −‖μ_c‖², so before any
step the linear head *is* the nearest-prototype classifier on squared Euclidean distance
(−‖f − μ_c‖² = 2μ_c·f − ‖μ_c‖² − ‖f‖², the last term shared by all classes); fine-tuning then
starts from a sensible classifier instead of a random one. ``FineTune`` adapts the whole
network; ``FineTuneHead`` (``--lower-problem problems.pretrain:FineTuneHead``) only the head,
the encoder staying fixed, as Chen et al.'s "Baseline" does.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from imaml.errors import UsageError
from problems.head import find_head, head_input, head_names
from problems.lower import UnrolledLower
from problems.upper import MetaInit

__all__ = ["Pretrained", "FineTune", "FineTuneHead", "prototype_head"]


class Pretrained(MetaInit):
    """θ of the baseline, trained by ``supervised_step`` on labelled mini-batches of the pooled
    training classes. ``task_stats`` gets (loss, accuracy) per step, ``meta_grad_norm`` the
    gradient norm, as the meta-learners' Upper problem does per task and per meta-update."""

    def supervised_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One optimizer step on the cross-entropy of ``x`` (this process's share of the batch)."""
        self.zero_grad()
        output = self.module(x)
        loss = F.cross_entropy(output, y)
        loss.backward()
        accuracy = (output.detach().argmax(-1) == y).float().mean()
        self.task_stats.append(torch.stack([loss.detach(), accuracy]))
        self.optimizer_step()  # MetaInit's: gradient sync, guard, clipping, then the step
        self.zero_grad()


def prototype_head(features: torch.Tensor, labels: torch.Tensor) -> tuple:
    """(W, b) of the linear head equal to the nearest-prototype classifier: W_c = 2μ_c,
    b_c = −‖μ_c‖², μ_c the mean of the ``features`` [n, d] with label c (0..N−1)."""
    ways = int(labels.max()) + 1
    sums = torch.zeros(ways, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=ways).to(features.dtype).clamp_min(1)
    means = sums / counts[:, None]
    return 2 * means, -means.pow(2).sum(1)


class FineTune(UnrolledLower):
    """A task's adaptation for the baseline: θ's encoder (and BatchNorm buffers), the
    prototype head of the support set, then SGD on the support loss of every parameter.

    It only runs in evaluation (the engine never meta-trains through it), so its steps build
    no graph to θ. The head has as many outputs as the task has classes, so ``--test-ways``
    may differ from ``--ways`` and from the number of training classes."""

    upper_class = Pretrained
    variable_ways = True

    def patch_modules(self) -> None:
        super().patch_modules()
        name, layer = find_head(self.module)
        if not isinstance(layer, nn.Linear) or layer.bias is None:
            raise UsageError(f"--algo pretrain and protonet fit a new linear head per task; the model's output layer "
                             f"{type(self.module).__name__}.{name} is not an nn.Linear with a bias")
        self._head_layer = layer
        self._head_index = {n.rsplit(".", 1)[-1]: i for i, n in enumerate(self._param_names)
                            if n in set(head_names(self.module))}

    def support_features(self) -> torch.Tensor:
        """What the head sees for the support set, at θ's encoder (the head's input)."""
        with torch.no_grad():
            return head_input(self._head_layer, lambda: self.fmodule(self.params, self.buffers,
                                                                     self.env.current.support_x))

    def on_inner_loop_start(self) -> None:
        super().on_inner_loop_start()  # θ's parameters and buffers
        weight, bias = prototype_head(self.support_features(), self.env.current.support_y)
        params = list(self.params)
        params[self._head_index["weight"]] = weight.detach().requires_grad_()
        params[self._head_index["bias"]] = bias.detach().requires_grad_()
        self.params = tuple(params)


class FineTuneHead(FineTune):
    """The same, fine-tuning only the head: the encoder stays θ's."""

    def trainable_parameters(self) -> List[torch.Tensor]:
        return [self.params[i] for i in self._head_index.values()]
