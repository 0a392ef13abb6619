"""``--algo protonet``: Prototypical Networks (Snell et al., NeurIPS 2017), the metric baseline.

θ's encoder (the model up to its output layer) embeds a task's support and query examples; each
class's prototype is the mean embedding of its support examples, and a query is classified by
its squared Euclidean distance to the prototypes (softmax over −‖f − μ_c‖²). Meta-training
minimizes that classifier's query loss over episodes, one optimizer step per meta-batch; there
is no inner loop. Meta-validation and meta-test run the same classifier through the engine's
one adaptation routine: ``PrototypeClassifier`` is ``FineTune``'s prototype head with no step
(W_c = 2μ_c, b_c = −‖μ_c‖²: the same softmax and the same argmax as −‖f − μ_c‖², the −‖f‖²
term being shared by every class).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from problems.head import find_head, head_input
from problems.pretrain import FineTune, prototype_head
from problems.upper import MetaInit

__all__ = ["Prototypical", "PrototypeClassifier"]


class Prototypical(MetaInit):
    """θ of ProtoNet, trained by ``prototype_step`` on episodes. ``task_stats`` gets (query loss,
    query accuracy) per task, ``meta_grad_norm`` the gradient norm, as the meta-learners' Upper
    problem does."""

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's features of ``x``: the input of the model's output layer."""
        return head_input(find_head(self.module)[1], lambda: self.module(x))

    def prototype_step(self, batch, tasks: range) -> None:
        """One optimizer step on the mean query loss of the tasks ``tasks`` of ``batch`` (this
        process's share of the meta-batch). Support and query sets are embedded apart, as every
        method here adapts and predicts (so with transductive BatchNorm each set has its own batch
        statistics, in training as at meta-test)."""
        self.zero_grad()
        for t in tasks:
            weight, bias = prototype_head(self.embed(batch.support_x[t]), batch.support_y[t])
            logits = self.embed(batch.query_x[t]) @ weight.T + bias
            loss = F.cross_entropy(logits, batch.query_y[t])
            (loss / len(tasks)).backward()
            accuracy = (logits.detach().argmax(-1) == batch.query_y[t]).float().mean()
            self.task_stats.append(torch.stack([loss.detach(), accuracy]))
        self.optimizer_step()  # MetaInit's: gradient sync, guard, clipping, then the step
        self.zero_grad()


class PrototypeClassifier(FineTune):
    """ProtoNet's adaptation at meta-validation and meta-test: θ's encoder and the prototype head
    of the support set, with no step (``engines.protonet`` adapts with none)."""

    upper_class = Prototypical
