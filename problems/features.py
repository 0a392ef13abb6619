"""``--adapt head``'s forward: the output layer applied to θ's features, computed once per inner loop
(ANIL's split: Raghu et al., 2020).

The encoder (every parameter but the output layer, ``problems.head``) is θ's own. It runs once
per task and inner loop on the support set and once on the query set, not at every inner step
and line-search trial; in meta-training its features keep their graph to θ, so the meta-gradient
reaches the encoder through one backward pass. The head's parameters always carry a task
dimension, [T, ways, F] and [T, ways]: one task at a time is T = 1, a whole meta-batch T = B.

With ``--algo maml|fomaml`` the meta-gradient is autograd through the head's steps, whose
gradients depend on the encoder's features, plus the encoder's direct effect on the query loss.
With ``--algo imaml``, g(φ_h; θ) = L_support(φ_h; θ_enc) + λ/2·‖φ_h − φ₀‖², φ₀ = θ_h or 0; the
meta-gradient is the exact total derivative of L_query(φ_h*(θ); θ_enc): the direct
∂L_query/∂θ_enc plus −(∂²g/∂θ∂φ_h)(∂²g/∂φ_h²)⁻¹∇φ_h L_query, whose encoder part flows through
the features. With a zero start, g is λ-strongly convex whatever the encoder (cross-entropy is
convex in a linear layer), so its minimizer is unique and the solve well posed; ``--hypergrad
exact`` then solves the head's system in closed form (``problems.head_solve``).
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn
from torch.func import functional_call

from imaml.errors import UsageError
from problems.head import head_input

__all__ = ["HeadOnFeatures"]


class HeadOnFeatures:
    """The forward strategy of a Lower problem that adapts its output layer alone: features of
    θ's encoder, cached per inner loop and input tensor, and the head applied to them for T tasks
    at once. ``lower.encoder_tensors(task, support)`` says which tensors the encoder runs with."""

    def __init__(self, lower, name: str, layer: nn.Module):
        if not isinstance(layer, nn.Linear):
            raise UsageError(f"--adapt head needs an output layer that is one nn.Linear; "
                             f"{type(lower.module).__name__}.{name} is a {type(layer).__name__}")
        self.lower, self.layer, self.has_bias = lower, layer, layer.bias is not None
        self.graph = True  # False while an inner step runs: its features need no graph to θ
        self.cache: list = []  # (input tensor, its features [T, B, F]) of this inner loop

    def forget(self) -> None:
        self.cache = []

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[T, B, F]: the head's input for examples ``x`` ([B, ...], or [T, B, ...] stacked),
        computed once per inner loop and input tensor."""
        for seen, feats in self.cache:
            if seen is x:
                return feats
        lower = self.lower
        support = x is lower.env.current.support_x
        rows = [head_input(self.layer, lambda: functional_call(lower.module, lower.encoder_tensors(t, support), (x_t,)))
                for t, x_t in enumerate(x if lower.stacked else x.unsqueeze(0))]
        feats = torch.stack(rows)
        self.cache.append((x, feats))
        return feats

    def support_features(self) -> List[torch.Tensor]:
        """The support set's features, once computed: a recomputed unrolled step reads θ's
        encoder only through them (``RecomputedSteps.step_reads``)."""
        return [feats for _, feats in self.cache]

    def forward(self, head: List[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The head's outputs [T, B, outputs] (unstacked: [B, outputs]) on ``x``'s features."""
        feats = self.features(x)
        if not self.graph:
            feats = feats.detach()
        weight = head[0].transpose(1, 2)
        out = torch.baddbmm(head[1].unsqueeze(1), feats, weight) if self.has_bias else torch.bmm(feats, weight)
        return out if self.lower.stacked else out[0]
