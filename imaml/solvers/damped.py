"""CG on the damped system (A + μI) x = b (``--hypergrad cg-damped``): the official iMAML code's."""

from __future__ import annotations

import torch

from imaml.solvers.base import (MatVec, SolveInfo, as_given, as_systems, check_budget, converged_within,
                                relative_residual)
from imaml.solvers.cg import conjugate_gradient

__all__ = ["damped_cg"]


def damped_cg(matvec: MatVec, b: torch.Tensor, max_steps: int, tol: float, damping,
              radius=None) -> tuple:
    """Solve the damped system (A + μI) x = b by CG: the official iMAML code's choice.

    Why: for μ > −λ_min(A) the damped operator is positive definite, so CG converges where A
    is indefinite; but x then solves another system than the implicit-function theorem's.
    At the damped solution A x − b = −μx, a bias of μ‖x‖. So the info's ``residual`` is the
    undamped ‖A x − b‖/‖b‖, which shows in the logs what the damping costs, and its
    ``damped_residual`` is ‖(A + μI)x − b‖/‖b‖, the one CG drove below ``tol``
    (``converged``). μ = 0 is plain CG.

    Args:
        matvec: u ↦ A u on [n] or [T, n], A symmetric.
        b: the right-hand side, [n] or [T, n] (T independent systems).
        max_steps: at most this many CG steps per system.
        tol: a system stops once its damped residual is ≤ tol·‖b‖.
        damping: μ ≥ 0, a number or one per system.
        radius: a trust radius for the truncated CG, as in ``conjugate_gradient``.

    Returns:
        (x, SolveInfo) for b of shape [n]; (x, a list of T SolveInfo) for [T, n]; one product
        more than ``conjugate_gradient``, to measure both residuals.

    Raises:
        ValueError: a negative or non-finite damping, ``max_steps`` < 0, or a bad ``tol``.
    """
    check_budget("damped_cg", max_steps, tol)
    matvec, b, single = as_systems(matvec, b)
    mu = torch.as_tensor(damping, dtype=b.dtype, device=b.device).expand(b.shape[0])
    if not bool(((mu >= 0) & torch.isfinite(mu)).all()):
        raise ValueError(f"damped_cg: damping must be >= 0 and finite, got {damping}")
    x, infos = conjugate_gradient(lambda u: matvec(u) + mu[:, None] * u, b, max_steps, tol, radius=radius)
    ax, b_norm = matvec(x), b.norm(dim=1)
    undamped = relative_residual(ax - b, b_norm).tolist()
    damped = relative_residual(ax + mu[:, None] * x - b, b_norm).tolist()
    infos = [SolveInfo("cg-damped", i.iterations, u, converged_within(i.converged, d, tol), boundary=i.boundary,
                       damped_residual=d)
             for i, u, d in zip(infos, undamped, damped)]
    return as_given(x, infos, single)
