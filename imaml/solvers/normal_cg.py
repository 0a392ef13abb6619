"""CG on the normal equations A² x = A b (``--hypergrad normal-cg``): for indefinite A."""

from __future__ import annotations

import torch

from imaml.solvers.base import MatVec, as_systems, check_budget, dot, measured, nonzero, where_rows

__all__ = ["normal_cg"]


def normal_cg(matvec: MatVec, b: torch.Tensor, max_steps: int, tol: float) -> tuple:
    """Solve A x = b for symmetric A by CG on the normal equations AᵀA x = Aᵀb, i.e. A² x = A b.

    Why: A² is positive semi-definite whatever A's inertia, so CG's guarantees hold again: the
    k-th iterate minimizes ‖b − A x‖ over K_k(A², A b), the residual never grows, and there
    is no negative curvature to stop on. The price: two products with A per step and the
    condition number squared, so it needs more steps than MINRES, whose space K_2k(A, b)
    contains this one for the same number of products. (TorchOpt's ``normal_cg`` is the model;
    this is the CGLS form, which carries the residual b − A x rather than A²'s, and stops on it.)

    Args:
        matvec: u ↦ A u on [n] or [T, n], A symmetric (so Aᵀu = A u).
        b: the right-hand side, [n] or [T, n] (T independent systems).
        max_steps: at most this many CG steps per system (two products each, plus one to start).
        tol: a system stops once ‖b − A x‖ ≤ tol·‖b‖ (by the recurrence).

    Returns:
        (x, SolveInfo) for b of shape [n]; (x, a list of T SolveInfo) for [T, n].

    Raises:
        ValueError: ``max_steps`` < 0, or ``tol`` negative or not finite.
    """
    check_budget("normal_cg", max_steps, tol)
    matvec, b, single = as_systems(matvec, b)
    b_norm = b.norm(dim=1)
    x, r = torch.zeros_like(b), b.clone()
    s = matvec(r)  # Aᵀr: the residual of the normal equations
    p = s
    gamma = dot(s, s)
    active = (b_norm > 0) & (gamma > 0)  # b = 0, or A b = 0 (then x = 0 is the least-squares answer)
    met = b_norm == 0
    steps = torch.zeros_like(b_norm, dtype=torch.long)
    for _ in range(max_steps):
        if not bool(active.any()):
            break
        q = matvec(p)
        alpha = where_rows(active, gamma / nonzero(dot(q, q)), torch.zeros_like(gamma))
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * q
        steps += active.long()
        met |= active & (r.norm(dim=1) <= tol * b_norm)
        active &= ~met
        if not bool(active.any()):
            break
        s = matvec(r)
        gamma_next = dot(s, s)
        p = where_rows(active, s + (gamma_next / nonzero(gamma))[:, None] * p, p)
        gamma = where_rows(active, gamma_next, gamma)
        active &= gamma_next > 0  # Aᵀr = 0: x solves the normal equations (A singular if r ≠ 0)
    return measured("normal-cg", matvec, x, b, steps, met, tol, single)
