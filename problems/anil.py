"""ANIL, "almost no inner loop" (Raghu et al., 2020): the inner loop adapts only the head.

The encoder (every parameter but the output layer, see ``problems.head``) is θ's own during
adaptation, frozen, and meta-learned through the query loss; the head starts at θ's and
takes the inner steps. Select with ``--lower-problem problems.anil:ANILUnrolled``
(``--algo maml`` or ``fomaml``) or ``problems.anil:ANILImplicit`` (``--algo imaml``).

Meta-gradients (both tested against plain autograd in float64):

- unrolled: autograd through the head's inner steps, whose gradients depend on the encoder,
  plus the encoder's direct effect on the query loss; first order (``fomaml``) treats the
  inner gradients as constants.
- implicit: the inner problem is over the head only, g(φ_h; θ) = L_support(φ_h; θ_enc) +
  λ/2·‖φ_h − θ_h‖², and the meta-gradient is the exact total derivative of
  L_query(φ_h*(θ); θ_enc): the direct ∂L_query/∂θ_enc, plus the implicit term
  −(∂²g/∂θ∂φ_h)(∂²g/∂φ_h²)⁻¹∇φ_h L_query, whose encoder part is −(∂²L_support/∂θ_enc∂φ_h)·x.
  The Hessian solved is the head's only (small), and the proximal term acts on the head.
"""

from __future__ import annotations

from typing import List

import torch
from torch.func import functional_call

from problems.head import head_names
from problems.lower import ImplicitLower, UnrolledLower

__all__ = ["ANILUnrolled", "ANILImplicit"]


class ANILUnrolled(UnrolledLower):
    """Unrolled MAML / FOMAML adapting the head only; encoder entries of ``self.params`` are
    θ's (graph-connected clones in training) and never updated."""

    def patch_modules(self) -> None:
        super().patch_modules()
        head = set(head_names(self.module))
        self._adapted = [i for i, name in enumerate(self._param_names) if name in head]

    def trainable_parameters(self) -> List[torch.Tensor]:
        """The head: the only entries that get gradients, so the only ones the inner SGD steps."""
        return [self.params[i] for i in self._adapted]


class ANILImplicit(ImplicitLower):
    """iMAML adapting the head only: the forward pass uses θ's encoder itself, so the query
    loss reaches it directly and the solver's cross term reaches it through the head."""

    def __init__(self, name, config, module, optimizer, device=None):
        super().__init__(name, config, module, optimizer, device=device)
        self._names = [name for name, _ in self.module.named_parameters()]
        self._head = set(head_names(self.module))

    def trainable_parameters(self) -> List[torch.Tensor]:
        return [p for name, p in self.module.named_parameters() if name in self._head]

    def _theta(self) -> dict:
        return dict(zip(self._names, self.meta_problem.initial_parameters()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        encoder = {name: t for name, t in self._theta().items() if name not in self._head}
        return functional_call(self.module, encoder, (x,))  # the head and buffers: this module's

    def regularizer(self) -> torch.Tensor:
        """λ/2·‖φ_h − θ_h‖²: the proximal term on what the inner loop adapts."""
        theta = self._theta()
        return 0.5 * self.config.lam * sum((p - theta[name]).pow(2).sum()
                                           for name, p in self.module.named_parameters() if name in self._head)
