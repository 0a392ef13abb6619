"""Implicit hypergradients: corrected replacements for betty-ml 0.1.1's solvers.

For a lower problem φ*(θ) = argmin_φ g(φ, θ) and an upper loss f(φ*), the implicit
function theorem gives

    df/dθ = −(∂²g/∂θ∂φ) · A⁻¹ · ∇φ f,    A = ∂²g/∂φ²  (the Hessian of the lower objective).

For iMAML, g = L_support(φ) + λ/2·‖φ − θ‖², so A = H + λI, −∂²g/∂θ∂φ = λI and

    df/dθ = λ (H + λI)⁻¹ ∇φ f = (I + H/λ)⁻¹ ∇φ f        (Rajeswaran et al., 2019, eq. 6).

The solvers below approximate x = A⁻¹ v for v = ∇φ f with Hessian-vector products only
(``exact`` forms A densely, for tiny models and tests); the cross term is then one more
autograd call, so they serve any lower objective, not just the proximal one.

Why not betty-ml's own: its CG updates the search direction with the old residual and
diverges; its ``cg_alpha`` scales the denominator but not the residual update; its Neumann
series has no step-size control; its DARTS restores the perturbed weights with a
non-in-place ``add`` and so leaves them shifted after every call. ``register_with_betty``
installs these solvers in Betty's dispatch table, under Betty's names and ours.

The core works on flat vectors (one ``torch.cat``), so there is no Python loop over
parameters inside the solver iterations.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from imaml.metrics import global_norm

__all__ = [
    "SolveInfo",
    "conjugate_gradient",
    "neumann_series",
    "largest_eigenvalue",
    "dense_solve",
    "SOLVERS",
    "register_with_betty",
    "register_solver",
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


# ----------------------------------------------------------------------------- core solvers


def conjugate_gradient(matvec: MatVec, b: torch.Tensor, max_steps: int, tol: float,
                       radius: Optional[float] = None) -> tuple:
    """Solve A x = b for symmetric A by conjugate gradients, truncated Steihaug-style.

    Stops after ``max_steps`` or when ‖r‖ ≤ tol·‖b‖. If A shows non-positive curvature along
    a search direction (pᵀAp ≤ 0: A is not positive definite), or, with a ``radius``, if the
    next iterate would leave the ball ‖x‖ ≤ radius, it stops there; with a radius it first
    moves along the current direction to the boundary (Steihaug, 1983). For symmetric
    positive-definite A the CG iterates grow in norm monotonically towards A⁻¹b, so a radius
    that bounds ‖A⁻¹b‖ never changes the result.
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = torch.dot(r, r)
    b_norm = math.sqrt(rs.item())
    if b_norm == 0.0:
        return x, SolveInfo("cg", 0, 0.0, True)
    steps = 0
    for steps in range(1, max_steps + 1):
        ap = matvec(p)
        pap = torch.dot(p, ap)
        if pap.item() <= 0.0:
            if radius is not None:
                x = x + _to_boundary(x, p, radius) * p
            return x, SolveInfo("cg", steps, _residual(matvec, x, b, b_norm), False, boundary=True)
        alpha = rs / pap
        step = alpha * p
        if radius is not None and (x + step).norm().item() >= radius:
            x = x + _to_boundary(x, p, radius) * p
            return x, SolveInfo("cg", steps, _residual(matvec, x, b, b_norm), False, boundary=True)
        x.add_(step)
        r.sub_(alpha * ap)
        rs_new = torch.dot(r, r)
        if math.sqrt(rs_new.item()) <= tol * b_norm:
            rs = rs_new
            break
        p = r + (rs_new / rs) * p  # the *new* residual (betty-ml 0.1.1 uses the old one)
        rs = rs_new
    residual = math.sqrt(rs.item()) / b_norm
    return x, SolveInfo("cg", steps, residual, residual <= tol)


def _to_boundary(x: torch.Tensor, p: torch.Tensor, radius: float) -> float:
    """The τ ≥ 0 with ‖x + τp‖ = radius (x inside the ball)."""
    pp, xp, xx = torch.dot(p, p).item(), torch.dot(x, p).item(), torch.dot(x, x).item()
    return (-xp + math.sqrt(max(xp * xp + pp * (radius * radius - xx), 0.0))) / pp


def _residual(matvec: MatVec, x: torch.Tensor, b: torch.Tensor, b_norm: float) -> float:
    """‖A x − b‖/‖b‖, one extra product (only on the early-exit paths)."""
    return (matvec(x) - b).norm().item() / b_norm


def largest_eigenvalue(matvec: MatVec, like: torch.Tensor, iterations: int = 20) -> float:
    """λ_max of symmetric PSD A by power iteration from a fixed start (no global RNG use)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(like.numel(), generator=gen, dtype=like.dtype).to(like.device)
    v /= v.norm()
    estimate = 0.0
    for _ in range(iterations):
        av = matvec(v)
        estimate = torch.dot(v, av).item()
        norm = av.norm()
        if norm.item() == 0.0:
            break
        v = av / norm
    return estimate


def neumann_series(matvec: MatVec, b: torch.Tensor, terms: int, alpha: Optional[float] = None) -> tuple:
    """x ≈ A⁻¹ b = α Σ_{k<terms} (I − αA)^k b, which converges for 0 < α < 2/λ_max(A).

    With ``alpha=None`` the step is 1/λ_max, λ_max estimated by power iteration (the
    estimate approaches λ_max from below, so the margin to 2/λ_max is kept).
    """
    if alpha is None:
        top = largest_eigenvalue(matvec, b)
        alpha = 1.0 / top if top > 0 else 1.0
    term = b.clone()
    total = b.clone()
    for _ in range(terms - 1):
        term = term - alpha * matvec(term)
        total.add_(term)
    x = alpha * total
    b_norm = b.norm().item()
    residual = (matvec(x) - b).norm().item() / b_norm if b_norm > 0 else 0.0
    return x, SolveInfo("neumann", terms, residual, math.isfinite(residual) and residual < 1.0)


def dense_solve(matvec: MatVec, b: torch.Tensor) -> tuple:
    """Exact A⁻¹ b from the dense matrix (n Hessian-vector products); tiny models only."""
    n = b.numel()
    if n > EXACT_MAX_PARAMS:
        from imaml.errors import UsageError

        raise UsageError(f"--hypergrad exact: the model has {n} parameters; the dense solve is for "
                         f"<= {EXACT_MAX_PARAMS} (tests, diagnostics); use --hypergrad cg")
    eye = torch.eye(n, dtype=b.dtype, device=b.device)
    a = torch.stack([matvec(e) for e in eye], dim=1)
    a = 0.5 * (a + a.T)  # symmetric up to rounding
    x = torch.linalg.solve(a, b)
    residual = ((a @ x - b).norm() / b.norm()).item() if b.norm() > 0 else 0.0
    return x, SolveInfo("exact", 1, residual, True)


# ----------------------------------------------------------------------------- Betty adapters


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _objective(curr) -> torch.Tensor:
    """The lower objective g at the current φ, re-evaluated for the solver. BatchNorm running
    statistics stay as the inner loop left them: a re-evaluation is not another step."""
    # The forward updates scratch copies (swapped in, not copied back: the graph keeps them).
    modules = curr.module.modules() if isinstance(getattr(curr, "module", None), torch.nn.Module) else ()
    slots = [(m, name) for m in modules for name, _ in m.named_buffers(recurse=False)]
    kept = [getattr(m, name) for m, name in slots]
    for (m, name), b in zip(slots, kept):
        setattr(m, name, b.clone())
    try:
        out = curr.training_step_exec(curr.cur_batch)
    finally:
        for (m, name), b in zip(slots, kept):
            setattr(m, name, b)
    return out["loss"] if isinstance(out, dict) else out


def _lower_grad(curr) -> tuple:
    """∇φ g at the current lower parameters, with its graph (for HVPs and the cross term)."""
    loss = _objective(curr)
    params = list(curr.trainable_parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grads = torch.autograd.grad(loss, params, create_graph=True)
    return _flat(grads), params


def _implicit(flat_grad: torch.Tensor, x: torch.Tensor, prev) -> List[Optional[torch.Tensor]]:
    """−(∂/∂θ)(∇φ g · x): the cross term applied to the solve's result."""
    grads = torch.autograd.grad(flat_grad, list(prev.trainable_parameters()), grad_outputs=x,
                                allow_unused=True)
    return [None if g is None else -g for g in grads]


def _solve_with(solve: Callable) -> Callable:
    """Turn ``solve(matvec, b, config) -> (x, info)`` into a Betty jvp function."""

    def jvp(vector, curr, prev):
        flat_grad, params = _lower_grad(curr)

        def matvec(u: torch.Tensor) -> torch.Tensor:
            return _flat(torch.autograd.grad(flat_grad, params, grad_outputs=u, retain_graph=True))

        with torch.no_grad():
            out = solve(matvec, _flat(vector).detach(), curr.config)
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], SolveInfo)):
            raise TypeError(f"hypergradient solver {getattr(solve, '__name__', solve)!r} returned "
                            f"{type(out).__name__}; it must return (x, SolveInfo)")
        x, info = out
        implicit = _implicit(flat_grad, x, prev)
        info.norm = float(global_norm(implicit))
        curr.hypergrad_info = info
        return implicit

    jvp.__name__ = solve.__name__
    return jvp


def _cg(matvec, b, config):
    return conjugate_gradient(matvec, b, config.cg_iterations, getattr(config, "cg_tol", 1e-10),
                              radius=trust_radius(b, config))


def trust_radius(b: torch.Tensor, config) -> Optional[float]:
    """‖b‖/λ for the proximal (iMAML) objective, where A = H + λI: the bound on ‖A⁻¹b‖ that
    holds whenever H ⪰ 0, i.e. whenever the inner solution is a minimizer of a locally convex
    support loss. Keeps the hypergradient λ·x no longer than ∇φ L_query when the system is
    indefinite. None (no bound) unless the config enables it and says what λ is."""
    lam = getattr(config, "lam", None)
    if not getattr(config, "cg_trust_region", False) or not lam:
        return None
    return b.norm().item() / lam


def _neumann(matvec, b, config):
    alpha = getattr(config, "neumann_alpha", None)
    return neumann_series(matvec, b, config.neumann_iterations, alpha)


def _exact(matvec, b, config):
    return dense_solve(matvec, b)


def darts(vector, curr, prev):
    """Betty's DARTS variant: the A ≈ I approximation, by central finite differences,

        −(∂²g/∂θ∂φ) v ≈ [∇θ g(φ − εv, θ) − ∇θ g(φ + εv, θ)] / 2ε,   ε = R/‖v‖,

    with R = ``config.darts_alpha``. The lower parameters are saved and copied back, so
    they are bit-identical after the call (betty-ml 0.1.1 leaves them shifted by εv).
    """
    params = list(curr.trainable_parameters())
    upper = list(prev.trainable_parameters())
    v = [t.detach() for t in vector]
    eps = curr.config.darts_alpha / _flat(v).norm().item()
    saved = [p.detach().clone() for p in params]

    def grad_at(sign: float):
        with torch.no_grad():
            for p, s, d in zip(params, saved, v):
                p.data.copy_(s).add_(d, alpha=sign * eps)
        return torch.autograd.grad(_objective(curr), upper, allow_unused=True)

    try:
        grad_plus, grad_minus = grad_at(1.0), grad_at(-1.0)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.data.copy_(s)
    implicit = [None if gp is None else (gm - gp) / (2 * eps) for gp, gm in zip(grad_plus, grad_minus)]
    curr.hypergrad_info = SolveInfo("darts", 1, float("nan"), True, float(global_norm(implicit)))
    return implicit


SOLVERS = {
    "cg": _solve_with(_cg),
    "neumann": _solve_with(_neumann),
    "darts": darts,
    "exact": _solve_with(_exact),
}


def register_solver(name: str, solve: Callable) -> str:
    """Install a user's linear solver in Betty's dispatch table; return the key to put in the
    Lower problem's ``config.type``.

    ``solve(matvec, b, config) -> (x, SolveInfo)`` approximates x = A⁻¹b for the Lower
    objective's Hessian A = ∂²g/∂φ² (``matvec(u)`` = A u, flat vectors; ``config`` is the
    Lower problem's ``LowerConfig``: ``lam``, ``cg_iterations``, ``cg_tol``, ...). The cross
    term and the bookkeeping are done here, as for the built-in solvers.
    """
    from betty import hypergradient

    key = f"imaml_{name}"
    hypergradient.jvp_fn_mapping[key] = _solve_with(solve)
    return key


def register_with_betty() -> None:
    """Install the corrected solvers in Betty's dispatch table (idempotent).

    Registered as ``imaml_<name>`` and also under Betty's own names (``cg``, ``neumann``,
    ``darts``), so a Betty problem configured with ``type="cg"`` anywhere in the process gets
    the corrected solver, never betty-ml 0.1.1's.
    """
    from betty import hypergradient

    for name, fn in SOLVERS.items():
        hypergradient.jvp_fn_mapping[f"imaml_{name}"] = fn
        if name in ("cg", "neumann", "darts"):
            hypergradient.jvp_fn_mapping[name] = fn
