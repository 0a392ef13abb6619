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
import numbers
from dataclasses import dataclass
from typing import Callable, Optional

import torch

__all__ = [
    "MatVec",
    "SolveInfo",
    "conjugate_gradient",
    "minres",
    "normal_cg",
    "damped_cg",
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
    damped_residual: float = float("nan")  # cg-damped: ‖(A + μI)x − v‖/‖v‖, the system it solved


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


# ----------------------------------------------------------------------------- indefinite systems
#
# Where the inner loop stopped short of a minimizer, A = H + λI is symmetric but indefinite and
# CG's theory no longer holds. These three solve such systems from products with A alone; each
# reports the residual ‖Ax − b‖/‖b‖ measured with one extra product (the recurrences' own
# estimate drifts from it by rounding). ``converged``: the measured residual is ≤ tol, or the
# stopping test was met and the measured residual is within a factor 2 of tol (that drift).


def minres(matvec: MatVec, b: torch.Tensor, max_steps: int, tol: float) -> tuple:
    """Solve A x = b for symmetric, possibly indefinite A by MINRES (Paige & Saunders, 1975).

    Why: on an indefinite A, CG minimizes no norm of the error: its residual can grow, and it
    meets pᵀAp ≤ 0 (ours stops there). MINRES takes the x_k of the same Krylov space
    K_k(A, b) that minimizes ‖b − A x_k‖, so its residual never grows (from x₀ = 0 it never
    exceeds ‖b‖) whatever A's inertia, at CG's cost: one product with A and a few vectors
    per step.

    Lanczos builds orthonormal v_1 = b/‖b‖, v_2, … with A V_k = V_{k+1} T̄_k (T̄_k tridiagonal);
    Givens rotations reduce T̄_k to upper-triangular R_k one column per step, and
    x_k = x_{k−1} + φ_k w_k with W_k = V_k R_k⁻¹ (a three-term recurrence). φ̄_k, the last
    entry of the rotated right-hand side ‖b‖e₁, equals ‖b − A x_k‖ in exact arithmetic, so
    the stopping test costs nothing. If A is singular and b not in its range, no x solves the
    system; a system then also stops, unconverged, at a least-squares solution (once
    ‖A r‖ ≤ tol·‖A‖·‖r‖), rather than growing x along A's null space.

    Args:
        matvec: u ↦ A u on [n] or [T, n], A symmetric.
        b: the right-hand side, [n] or [T, n] (T independent systems).
        max_steps: at most this many Lanczos steps (products with A) per system.
        tol: a system stops once φ̄_k ≤ tol·‖b‖.

    Returns:
        (x, SolveInfo) for b of shape [n]; (x, a list of T SolveInfo) for [T, n].

    Raises:
        ValueError: ``max_steps`` < 0, or ``tol`` negative or not finite.
    """
    _check_budget("minres", max_steps, tol)
    matvec, b, single = _batched(matvec, b)
    b_norm = b.norm(dim=1)
    zero = torch.zeros_like(b_norm)
    x, w, w_prev, v_prev = (torch.zeros_like(b) for _ in range(4))
    v = b / _nonzero(b_norm)[:, None]
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
        alpha = _dot(v, p)
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
        new = dict(x=x + (cs_next * phibar)[:, None] * w_next, w=w_next, w_prev=w, v=p / _nonzero(beta_next)[:, None],
                   v_prev=v, beta=beta_next, phibar=sn_next * phibar, cs=cs_next, sn=sn_next,
                   dbar=-cs * beta_next, eps=sn * beta_next)
        keep = dict(x=x, w=w, w_prev=w_prev, v=v, v_prev=v_prev, beta=beta, phibar=phibar, cs=cs, sn=sn,
                    dbar=dbar, eps=eps)
        active &= ~singular
        state = {k: _where(active, new[k], keep[k]) for k in new}  # stopped systems stay as they were
        x, w, w_prev, v, v_prev = state["x"], state["w"], state["w_prev"], state["v"], state["v_prev"]
        beta, phibar, cs, sn, dbar, eps = (state[k] for k in ("beta", "phibar", "cs", "sn", "dbar", "eps"))
        steps += active.long()
        met |= active & (phibar <= tol * b_norm)
        # β_{k+1} = 0: K_k(A, b) is invariant under A, so the solution is in it
        active &= ~(met | (beta_next == 0))
    return _measured("minres", matvec, x, b, steps, met, tol, single)


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
    _check_budget("normal_cg", max_steps, tol)
    matvec, b, single = _batched(matvec, b)
    b_norm = b.norm(dim=1)
    x, r = torch.zeros_like(b), b.clone()
    s = matvec(r)  # Aᵀr: the residual of the normal equations
    p = s
    gamma = _dot(s, s)
    active = (b_norm > 0) & (gamma > 0)  # b = 0, or A b = 0 (then x = 0 is the least-squares answer)
    met = b_norm == 0
    steps = torch.zeros_like(b_norm, dtype=torch.long)
    for _ in range(max_steps):
        if not bool(active.any()):
            break
        q = matvec(p)
        alpha = _where(active, gamma / _nonzero(_dot(q, q)), torch.zeros_like(gamma))
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * q
        steps += active.long()
        met |= active & (r.norm(dim=1) <= tol * b_norm)
        active &= ~met
        if not bool(active.any()):
            break
        s = matvec(r)
        gamma_next = _dot(s, s)
        p = _where(active, s + (gamma_next / _nonzero(gamma))[:, None] * p, p)
        gamma = _where(active, gamma_next, gamma)
        active &= gamma_next > 0  # Aᵀr = 0: x solves the normal equations (A singular if r ≠ 0)
    return _measured("normal-cg", matvec, x, b, steps, met, tol, single)


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
    _check_budget("damped_cg", max_steps, tol)
    matvec, b, single = _batched(matvec, b)
    mu = torch.as_tensor(damping, dtype=b.dtype, device=b.device).expand(b.shape[0])
    if not bool(((mu >= 0) & torch.isfinite(mu)).all()):
        raise ValueError(f"damped_cg: damping must be >= 0 and finite, got {damping}")
    x, infos = conjugate_gradient(lambda u: matvec(u) + mu[:, None] * u, b, max_steps, tol, radius=radius)
    ax, b_norm = matvec(x), b.norm(dim=1)
    undamped = _relative(ax - b, b_norm).tolist()
    damped = _relative(ax + mu[:, None] * x - b, b_norm).tolist()
    infos = [SolveInfo("cg-damped", i.iterations, u, _converged(i.converged, d, tol), boundary=i.boundary,
                       damped_residual=d)
             for i, u, d in zip(infos, undamped, damped)]
    return _unbatched(x, infos, single)


def _measured(name: str, matvec: MatVec, x: torch.Tensor, b: torch.Tensor, steps: torch.Tensor, met: torch.Tensor,
              tol: float, single: bool) -> tuple:
    """(x, infos) with ‖Ax − b‖/‖b‖ measured by one more product, and whether it converged."""
    residual = _relative(matvec(x) - b, b.norm(dim=1)).tolist()
    infos = [SolveInfo(name, n, res, _converged(ok, res, tol)) for n, res, ok in zip(steps.tolist(), residual, met.tolist())]
    return _unbatched(x, infos, single)


def _converged(met: bool, measured: float, tol: float) -> bool:
    """The measured residual is ≤ tol, or the recurrence's stopping test was met and the
    measured residual agrees with it up to rounding (a factor 2)."""
    return measured <= tol or (met and measured <= 2 * tol)


def _relative(r: torch.Tensor, b_norm: torch.Tensor) -> torch.Tensor:
    """‖r‖/‖b‖ per row, 0 where b = 0 (x = 0 solves those exactly)."""
    return torch.where(b_norm > 0, r.norm(dim=1) / _nonzero(b_norm), torch.zeros_like(b_norm))


def _nonzero(t: torch.Tensor) -> torch.Tensor:
    """t with zeros replaced by ones: a safe denominator where the zero rows are masked anyway."""
    return torch.where(t == 0, torch.ones_like(t), t)


def _where(rows: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per system: ``new`` where ``rows`` ([T] bool) is set, else ``old`` (for [T] or [T, n])."""
    return torch.where(rows if new.dim() == 1 else rows[:, None], new, old)


def _check_budget(name: str, max_steps: int, tol: float) -> None:
    """Refuse a budget the loops would misread (a negative step count runs none; NaN never stops)."""
    if not (isinstance(max_steps, numbers.Integral) and max_steps >= 0):
        raise ValueError(f"{name}: max_steps must be an integer >= 0, got {max_steps!r}")
    if not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"{name}: tol must be >= 0 and finite, got {tol!r}")
