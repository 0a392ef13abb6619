"""Conjugate gradients, truncated Steihaug-style (``--hypergrad cg``)."""

from __future__ import annotations

import torch

from imaml.solvers.base import MatVec, SolveInfo, as_given, as_systems, dot

__all__ = ["conjugate_gradient"]


def conjugate_gradient(matvec: MatVec, b: torch.Tensor, max_steps: int, tol: float,
                       radius=None) -> tuple:
    """Solve A x = b for symmetric A by conjugate gradients, truncated Steihaug-style.

    Stops after ``max_steps`` or when ‖r‖ ≤ tol·‖b‖. If A shows non-positive curvature along
    a search direction (pᵀAp ≤ 0: A is not positive definite), or, with a ``radius``, if the
    next iterate would leave the ball ‖x‖ ≤ radius, it stops there; with a radius it first
    moves along the current direction to the boundary (Steihaug, 1983). For symmetric
    positive-definite A the CG iterates grow in norm monotonically towards A⁻¹b, so a radius
    that bounds ‖A⁻¹b‖ never changes the result. ``radius``: None, a number, or one per system.
    """
    matvec, b, single = as_systems(matvec, b)
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = dot(r, r)
    b_norm = rs.sqrt()
    radius = None if radius is None else torch.as_tensor(radius, dtype=b.dtype, device=b.device).expand_as(rs)
    active = b_norm > 0  # a zero right-hand side is solved by x = 0
    steps = torch.zeros_like(rs, dtype=torch.long)
    boundary = torch.zeros_like(active)
    converged = ~active
    for _ in range(max_steps):
        if not bool(active.any()):
            break
        ap = matvec(p)
        pap = dot(p, ap)
        steps += active.long()
        alpha = rs / torch.where(pap == 0, torch.ones_like(pap), pap)
        stop = active & (pap <= 0)  # negative curvature
        if radius is not None:
            stop = stop | (active & ((x + alpha[:, None] * p).norm(dim=1) >= radius))  # would leave the ball
            tau = _to_boundary(x, p, radius)
            x = x + torch.where(stop, tau, torch.zeros_like(tau))[:, None] * p
        boundary |= stop
        active &= ~stop
        alpha = torch.where(active, alpha, torch.zeros_like(alpha))
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * ap
        rs_new = dot(r, r)
        done = active & (rs_new.sqrt() <= tol * b_norm)
        converged |= done
        beta = rs_new / torch.where(rs == 0, torch.ones_like(rs), rs)
        # the *new* residual (betty-ml 0.1.1 uses the old one)
        p = torch.where((active & ~done)[:, None], r + beta[:, None] * p, p)
        rs = torch.where(active, rs_new, rs)
        active &= ~done
    safe_norm = torch.where(b_norm == 0, torch.ones_like(b_norm), b_norm)
    residual = rs.sqrt() / safe_norm
    if bool(boundary.any()):  # these stopped early: measure ‖Ax − b‖ (one extra product)
        residual = torch.where(boundary, (matvec(x) - b).norm(dim=1) / safe_norm, residual)
    infos = [SolveInfo("cg", int(n), float(res), bool(ok) or (not edge and float(res) <= tol), boundary=bool(edge))
             for n, res, ok, edge in zip(steps.tolist(), residual.tolist(), converged.tolist(), boundary.tolist())]
    return as_given(x, infos, single)


def _to_boundary(x: torch.Tensor, p: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Per system, the τ ≥ 0 with ‖x + τp‖ = radius (x inside the ball)."""
    pp, xp, xx = dot(p, p), dot(x, p), dot(x, x)
    disc = (xp * xp + pp * (radius * radius - xx)).clamp_min(0.0)
    return (-xp + disc.sqrt()) / torch.where(pp == 0, torch.ones_like(pp), pp)
