"""Linear solvers for the implicit meta-gradient: x ≈ A⁻¹b from matrix-vector products only.

``imaml.hypergrad`` hands these a Hessian-vector product of the Lower objective and
∇φ L_query; they know nothing of Betty or of models, so they can be tested on plain dense
matrices (``tests/test_solvers.py``, ``tests/test_vectorized.py``).

Every solver takes b as [n] (one system) or [T, n] (T independent systems, one per task of a
task-vectorized meta-batch, whose matrix is block-diagonal), with ``matvec`` mapping the same
shape to itself. All scalars (step sizes, stopping decisions) are per system, so solving T
systems at once gives what T separate solves give, with one host sync per iteration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

__all__ = [
    "MatVec",
    "SolveInfo",
    "conjugate_gradient",
    "neumann_series",
    "largest_eigenvalue",
    "dense_solve",
    "EXACT_MAX_PARAMS",
]

MatVec = Callable[[torch.Tensor], torch.Tensor]
EXACT_MAX_PARAMS = 10_000


@dataclass
class SolveInfo:
    """What a solve did, for the logs: the relative residual ‖Ax − v‖/‖v‖ it ended with."""

    solver: str
    iterations: int
    residual: float
    converged: bool
    norm: float = float("nan")  # ‖hypergradient‖, filled in by the Betty adapter
    boundary: bool = False  # CG stopped on negative curvature or at its trust radius


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
    matvec, b, single = _batched(matvec, b)
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = _dot(r, r)
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
        pap = _dot(p, ap)
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
        rs_new = _dot(r, r)
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
    return _unbatched(x, infos, single)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of [T, n] tensors: [T]."""
    return (a * b).sum(dim=1)


def _batched(matvec: MatVec, b: torch.Tensor) -> tuple:
    """(matvec on [T, n], b as [T, n], whether b was one system [n])."""
    if b.dim() == 2:
        return matvec, b, False
    return (lambda u: matvec(u[0]).unsqueeze(0)), b.unsqueeze(0), True


def _unbatched(x: torch.Tensor, infos: list, single: bool) -> tuple:
    return (x[0], infos[0]) if single else (x, infos)


def _to_boundary(x: torch.Tensor, p: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Per system, the τ ≥ 0 with ‖x + τp‖ = radius (x inside the ball)."""
    pp, xp, xx = _dot(p, p), _dot(x, p), _dot(x, x)
    disc = (xp * xp + pp * (radius * radius - xx)).clamp_min(0.0)
    return (-xp + disc.sqrt()) / torch.where(pp == 0, torch.ones_like(pp), pp)


def largest_eigenvalue(matvec: MatVec, like: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """λ_max of symmetric PSD A by power iteration from a fixed start (no global RNG use);
    ``like`` is [n] or [T, n], and the result has one estimate per system ([] or [T])."""
    matvec, like, single = _batched(matvec, like)
    gen = torch.Generator(device="cpu").manual_seed(0)
    start = torch.randn(like.shape[1], generator=gen, dtype=like.dtype).to(like.device)
    v = (start / start.norm()).expand_as(like).clone()
    estimate = torch.zeros(like.shape[0], dtype=like.dtype, device=like.device)
    live = torch.ones_like(estimate, dtype=torch.bool)
    for _ in range(iterations):
        av = matvec(v)
        estimate = torch.where(live, _dot(v, av), estimate)
        norm = av.norm(dim=1)
        live = live & (norm != 0)
        if not bool(live.any()):
            break
        v = torch.where(live[:, None], av / torch.where(norm == 0, torch.ones_like(norm), norm)[:, None], v)
    return estimate[0] if single else estimate


def neumann_series(matvec: MatVec, b: torch.Tensor, terms: int, alpha: Optional[float] = None) -> tuple:
    """x ≈ A⁻¹ b = α Σ_{k<terms} (I − αA)^k b, which converges for 0 < α < 2/λ_max(A).

    With ``alpha=None`` the step is 1/λ_max, λ_max estimated by power iteration (the
    estimate approaches λ_max from below, so the margin to 2/λ_max is kept), per system.
    """
    matvec, b, single = _batched(matvec, b)
    if alpha is None:
        top = largest_eigenvalue(matvec, b)
        step = torch.where(top > 0, 1.0 / torch.where(top > 0, top, torch.ones_like(top)), torch.ones_like(top))
    else:
        step = torch.full((b.shape[0],), float(alpha), dtype=b.dtype, device=b.device)
    term = b.clone()
    total = b.clone()
    for _ in range(terms - 1):
        term = term - step[:, None] * matvec(term)
        total.add_(term)
    x = step[:, None] * total
    b_norm = b.norm(dim=1)
    residual = torch.where(b_norm > 0, (matvec(x) - b).norm(dim=1) / torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm)),
                           torch.zeros_like(b_norm))
    infos = [SolveInfo("neumann", terms, res, math.isfinite(res) and res < 1.0) for res in residual.tolist()]
    return _unbatched(x, infos, single)


def dense_solve(matvec: MatVec, b: torch.Tensor) -> tuple:
    """Exact A⁻¹ b from the dense matrix (n Hessian-vector products); tiny models only."""
    matvec, b, single = _batched(matvec, b)
    n = b.shape[1]
    if n > EXACT_MAX_PARAMS:
        from imaml.errors import UsageError

        raise UsageError(f"--hypergrad exact: the model has {n} parameters; the dense solve is for "
                         f"<= {EXACT_MAX_PARAMS} (tests, diagnostics); use --hypergrad cg")
    eye = torch.eye(n, dtype=b.dtype, device=b.device)
    a = torch.stack([matvec(e.expand_as(b)) for e in eye], dim=2)  # [T, n, n], column i = A e_i
    a = 0.5 * (a + a.transpose(1, 2))  # symmetric up to rounding
    x = torch.linalg.solve(a, b)
    b_norm = b.norm(dim=1)
    residual = torch.where(b_norm > 0, (a @ x[:, :, None])[:, :, 0].sub(b).norm(dim=1) / torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm)),
                           torch.zeros_like(b_norm))
    infos = [SolveInfo("exact", 1, res, True) for res in residual.tolist()]
    return _unbatched(x, infos, single)
