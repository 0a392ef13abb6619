"""MINRES for symmetric, possibly indefinite systems (``--hypergrad minres``).

Where the inner loop stopped short of a minimizer, A = H + λI is symmetric but indefinite and
CG's theory no longer holds. MINRES, normal-equation CG and damped CG solve such systems from
products with A alone; each reports the residual ‖Ax − b‖/‖b‖ measured with one extra product
(the recurrences' own estimate drifts from it by rounding). ``converged``: the measured residual
is ≤ tol, or the stopping test was met and the measured residual is within a factor 2 of tol.

Why MINRES: on an indefinite A, CG minimizes no norm of the error: its residual can grow, and
it meets pᵀAp ≤ 0 (ours stops there). MINRES takes the x_k of the same Krylov space K_k(A, b)
that minimizes ‖b − A x_k‖, so its residual never grows (from x₀ = 0 it never exceeds ‖b‖)
whatever A's inertia, at CG's cost: one product with A and a few vectors per step.

How: Lanczos builds orthonormal v_1 = b/‖b‖, v_2, … with A V_k = V_{k+1} T̄_k (T̄_k
tridiagonal); Givens rotations reduce T̄_k to upper-triangular R_k one column per step, and
x_k = x_{k−1} + φ_k w_k with W_k = V_k R_k⁻¹ (a three-term recurrence). φ̄_k, the last entry of
the rotated right-hand side ‖b‖e₁, equals ‖b − A x_k‖ in exact arithmetic, so the stopping test
costs nothing. If A is singular and b not in its range, no x solves the system; a system then
also stops, unconverged, at a least-squares solution (once ‖A r‖ ≤ tol·‖A‖·‖r‖), rather than
growing x along A's null space.
"""

from __future__ import annotations

import torch

from imaml.solvers.base import MatVec, as_systems, check_budget, dot, measured, nonzero, where_rows

__all__ = ["minres"]


def minres(matvec: MatVec, b: torch.Tensor, max_steps: int, tol: float) -> tuple:
    """Solve A x = b for symmetric, possibly indefinite A by MINRES (Paige & Saunders, 1975).

    Args: ``matvec`` u ↦ A u on [n] or [T, n], A symmetric; ``b`` [n] or [T, n] (T independent
    systems); ``max_steps`` Lanczos steps (products with A) per system at most; ``tol``: a
    system stops once φ̄_k ≤ tol·‖b‖. Returns (x, SolveInfo) for [n], (x, T SolveInfo) for
    [T, n]. Raises ValueError for ``max_steps`` < 0 or a negative or non-finite ``tol``.
    """
    check_budget("minres", max_steps, tol)
    matvec, b, single = as_systems(matvec, b)
    b_norm = b.norm(dim=1)
    zero = torch.zeros_like(b_norm)
    x, w, w_prev, v_prev = (torch.zeros_like(b) for _ in range(4))
    v = b / nonzero(b_norm)[:, None]
    beta = zero  # β_k, the coefficient of v_{k−1} in A v_k (v_0 = 0)
    phibar = b_norm  # the residual estimate φ̄_k
    cs, sn = -torch.ones_like(b_norm), zero  # the last rotation; cs = −1 starts the recurrences
    dbar, eps = zero, zero  # what the last two rotations left for the next column of T̄
    active = b_norm > 0  # a zero right-hand side is solved by x = 0
    steps = torch.zeros_like(b_norm, dtype=torch.long)
    met = ~active
    gmax, anorm2 = zero, zero  # the largest diagonal of R so far, ‖T̄_k‖_F²
    tiny, machine_eps = torch.finfo(b.dtype).tiny, torch.finfo(b.dtype).eps
    for _ in range(max_steps):
        if not bool(active.any()):
            break
        p = matvec(v)
        alpha = dot(v, p)
        p = p - alpha[:, None] * v - beta[:, None] * v_prev
        beta_next = p.norm(dim=1)
        # the previous two rotations applied to this column (β_k, α_k, β_{k+1}) of T̄
        delta = cs * dbar + sn * alpha
        gbar = sn * dbar - cs * alpha
        # the new rotation, which zeroes β_{k+1}
        gamma = torch.hypot(gbar, beta_next)
        gmax = torch.maximum(gmax, gamma)
        anorm2 = anorm2 + alpha * alpha + beta * beta + beta_next * beta_next  # ‖T̄‖_F² ≈ ‖A‖_F² from below
        # A singular and b not in its range: x_{k−1} already solves the least-squares problem
        # (‖A r‖ = φ̄·‖(γ̄, −c·β_{k+1})‖ ≈ 0 relative to ‖A‖‖r‖), or R_k is numerically singular
        # (cond ≥ 0.1/ε); the next step would only grow x along A's null space, so the system
        # keeps x_{k−1} and stops (Paige & Saunders' tests, as in SciPy's minres)
        singular = ((torch.hypot(gbar, cs * beta_next) <= max(tol, machine_eps) * anorm2.sqrt())
                    | (gamma <= 10 * machine_eps * gmax))
        gamma = gamma.clamp_min(tiny)
        cs_next, sn_next = gbar / gamma, beta_next / gamma
        w_next = (v - eps[:, None] * w_prev - delta[:, None] * w) / gamma[:, None]
        new = dict(x=x + (cs_next * phibar)[:, None] * w_next, w=w_next, w_prev=w, v=p / nonzero(beta_next)[:, None],
                   v_prev=v, beta=beta_next, phibar=sn_next * phibar, cs=cs_next, sn=sn_next,
                   dbar=-cs * beta_next, eps=sn * beta_next)
        keep = dict(x=x, w=w, w_prev=w_prev, v=v, v_prev=v_prev, beta=beta, phibar=phibar, cs=cs, sn=sn,
                    dbar=dbar, eps=eps)
        active &= ~singular
        state = {k: where_rows(active, new[k], keep[k]) for k in new}  # stopped systems stay as they were
        x, w, w_prev, v, v_prev = state["x"], state["w"], state["w_prev"], state["v"], state["v_prev"]
        beta, phibar, cs, sn, dbar, eps = (state[k] for k in ("beta", "phibar", "cs", "sn", "dbar", "eps"))
        steps += active.long()
        met |= active & (phibar <= tol * b_norm)
        # β_{k+1} = 0: K_k(A, b) is invariant under A, so the solution is in it
        active &= ~(met | (beta_next == 0))
    return measured("minres", matvec, x, b, steps, met, tol, single)
