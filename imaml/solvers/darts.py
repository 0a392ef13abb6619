"""DARTS' finite-difference hypergradient (``--hypergrad darts``), a Betty jvp function."""

from __future__ import annotations

import torch

from imaml.metrics import global_norm
from imaml.solvers.base import SolveInfo
from imaml.solvers.implicit import flat

__all__ = ["darts"]


def darts(vector, curr, prev):
    """Betty's DARTS variant: the A ≈ I approximation, by central finite differences,

        −(∂²g/∂θ∂φ) v ≈ [∇θ g(φ − εv, θ) − ∇θ g(φ + εv, θ)] / 2ε,   ε = R/‖v‖,

    with R = ``--darts-radius``. The lower parameters are saved and copied back, so
    they are bit-identical after the call (betty-ml 0.1.1 leaves them shifted by εv).
    One task at a time (the Lower problem's parameters unstacked).
    """
    params = list(curr.trainable_parameters())
    upper = list(prev.trainable_parameters())
    v = [t.detach() for t in vector]
    eps = curr.settings.darts_radius / flat(v).norm().item()
    saved = [p.detach().clone() for p in params]

    def grad_at(sign: float):
        with torch.no_grad():
            for p, s, d in zip(params, saved, v):
                p.data.copy_(s).add_(d, alpha=sign * eps)
        # the graph kept: a Lower problem may reuse one graph to θ for both points (the head's
        # features, computed once per inner loop)
        return torch.autograd.grad(curr.inner_objective(), upper, allow_unused=True, retain_graph=True)

    try:
        grad_plus, grad_minus = grad_at(1.0), grad_at(-1.0)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.data.copy_(s)
    implicit = [None if gp is None else (gm - gp) / (2 * eps) for gp, gm in zip(grad_plus, grad_minus)]
    curr.hypergrad_infos = [SolveInfo("darts", 1, float("nan"), True, float(global_norm(implicit)))]
    return implicit
