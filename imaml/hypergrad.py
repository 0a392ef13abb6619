"""Implicit hypergradients: corrected replacements for betty-ml 0.1.1's solvers.

For a lower problem φ*(θ) = argmin_φ g(φ, θ) and an upper loss f(φ*), the implicit
function theorem gives

    df/dθ = −(∂²g/∂θ∂φ) · A⁻¹ · ∇φ f,    A = ∂²g/∂φ²  (the Hessian of the lower objective).

For iMAML, g = L_support(φ) + λ/2·‖φ − θ‖², so A = H + λI, −∂²g/∂θ∂φ = λI and

    df/dθ = λ (H + λI)⁻¹ ∇φ f = (I + H/λ)⁻¹ ∇φ f        (Rajeswaran et al., 2019, eq. 6).

The solvers (``imaml.linear_solvers``, re-exported here) approximate x = A⁻¹ v for v = ∇φ f
with Hessian-vector products only (``exact`` forms A densely, for tiny models and tests); the
adapters below give them the lower objective's Hessian-vector product, and the cross term is
then one more autograd call, so they serve any lower objective, not just the proximal one.

Why not betty-ml's own: its CG updates the search direction with the old residual and
diverges; its ``cg_alpha`` scales the denominator but not the residual update; its Neumann
series has no step-size control; its DARTS restores the perturbed weights with a
non-in-place ``add`` and so leaves them shifted after every call. ``register_with_betty``
installs these solvers in Betty's dispatch table, under Betty's names and ours.

The core works on flat vectors (one ``torch.cat``), so there is no Python loop over
parameters inside the solver iterations; a task-vectorized meta-batch passes one row per task
([T, n]) and every step size and stopping decision stays per task, so it gets what T separate
solves give.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Callable, Optional, Sequence

import torch

from imaml.linear_solvers import (SolveInfo, conjugate_gradient, damped_cg, dense_solve, largest_eigenvalue,
                                  minres, neumann_series, normal_cg)
from imaml.metrics import global_norm

__all__ = [
    "SolveInfo",
    "conjugate_gradient",
    "minres",
    "normal_cg",
    "damped_cg",
    "neumann_series",
    "largest_eigenvalue",
    "dense_solve",
    "SOLVERS",
    "register_with_betty",
    "register_solver",
]


# ----------------------------------------------------------------------------- Betty adapters


def _flat(tensors: Sequence[torch.Tensor], tasks: Optional[int] = None) -> torch.Tensor:
    """One flat vector, or with ``tasks`` one row per task ([T, n]) of task-stacked tensors."""
    if tasks is None:
        return torch.cat([t.reshape(-1) for t in tensors])
    return torch.cat([t.reshape(tasks, -1) for t in tensors], dim=1)


def _num_tasks(curr) -> int:
    """Tasks stacked along dim 0 of the lower parameters (a task-vectorized Lower problem says
    how many; otherwise one task, unstacked)."""
    return getattr(curr, "num_tasks", 1)


@contextmanager
def scratch_buffers(module):
    """Forward passes inside see the buffers as they are but update scratch copies (swapped in,
    not copied back: a graph may keep them), so BatchNorm's running statistics stay as the inner
    loop left them: a re-evaluation is not another step."""
    modules = module.modules() if isinstance(module, torch.nn.Module) else ()
    slots = [(m, name) for m in modules for name, _ in m.named_buffers(recurse=False)]
    kept = [getattr(m, name) for m, name in slots]
    for (m, name), b in zip(slots, kept):
        setattr(m, name, b.clone())
    try:
        yield
    finally:
        for (m, name), b in zip(slots, kept):
            setattr(m, name, b)


def _objective(curr) -> torch.Tensor:
    """The lower objective g at the current φ, re-evaluated for the solver."""
    with scratch_buffers(getattr(curr, "module", None)):
        out = curr.training_step_exec(curr.cur_batch)
    return out["loss"] if isinstance(out, dict) else out


def _lower_grad(curr) -> tuple:
    """∇φ g at the current lower parameters, with its graph (for HVPs and the cross term), as
    [T, n]: the lower objective of T stacked tasks is the sum of theirs, so row t is ∇φ_t g_t."""
    loss = _objective(curr)
    params = list(curr.trainable_parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grads = torch.autograd.grad(loss, params, create_graph=True)
    return _flat(grads, _num_tasks(curr)), params


def _implicit(flat_grad: torch.Tensor, x: torch.Tensor, curr, prev) -> tuple:
    """−(∂/∂θ)(∇φ g · x): the cross term applied to the solve's result, summed over tasks,
    and each task's norm. A task-vectorized Lower problem exposes the per-task views of θ its
    objective used (``task_meta_parameters``, [T, ...]), which give the per-task terms in the
    same single backward pass."""
    per_task = getattr(curr, "task_meta_parameters", None)
    inputs = list(per_task) if per_task is not None else list(prev.trainable_parameters())
    grads = torch.autograd.grad(flat_grad, inputs, grad_outputs=x, allow_unused=True)
    grads = [None if g is None else -g for g in grads]
    if per_task is None:
        return grads, [float(global_norm(grads))]
    norms = torch.stack([g.reshape(len(x), -1).norm(dim=1) for g in grads if g is not None]).norm(dim=0)
    return [None if g is None else g.sum(0) for g in grads], norms.tolist()


def _solve_with(solve: Callable) -> Callable:
    """Turn ``solve(matvec, b, config) -> (x, infos)`` (b, x: [T, n]) into a Betty jvp function."""

    def jvp(vector, curr, prev):
        flat_grad, params = _lower_grad(curr)
        tasks = _num_tasks(curr)
        if hasattr(curr, "record_final_gradient"):  # the inner loop's stationarity, at no extra cost
            curr.record_final_gradient(flat_grad)

        def matvec(u: torch.Tensor) -> torch.Tensor:
            return _flat(torch.autograd.grad(flat_grad, params, grad_outputs=u, retain_graph=True), tasks)

        with torch.no_grad():
            out = solve(matvec, _flat(vector, tasks).detach(), curr.config)
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], list)):
            raise TypeError(f"hypergradient solver {getattr(solve, '__name__', solve)!r} returned "
                            f"{type(out).__name__}; it must return (x, infos)")
        x, infos = out
        implicit, norms = _implicit(flat_grad, x, curr, prev)
        for info, norm in zip(infos, norms):
            info.norm = norm
        curr.hypergrad_infos = infos  # one per task
        curr.hypergrad_info = infos[-1]
        return implicit

    jvp.__name__ = solve.__name__
    return jvp


def _cg(matvec, b, config):
    return conjugate_gradient(matvec, b, config.cg_iterations, getattr(config, "cg_tol", 1e-10),
                              radius=trust_radius(b, config))


def trust_radius(b: torch.Tensor, config) -> Optional[torch.Tensor]:
    """‖b‖/λ for the proximal (iMAML) objective, where A = H + λI: the bound on ‖A⁻¹b‖ that
    holds whenever H ⪰ 0, i.e. whenever the inner solution is a minimizer of a locally convex
    support loss. Keeps the hypergradient λ·x no longer than ∇φ L_query when the system is
    indefinite. None (no bound) unless the config enables it and says what λ is."""
    lam = getattr(config, "lam", None)
    if not getattr(config, "cg_trust_region", False) or not lam:
        return None
    return b.norm(dim=-1) / lam  # one radius per system


def _neumann(matvec, b, config):
    alpha = getattr(config, "neumann_alpha", None)
    return neumann_series(matvec, b, config.neumann_iterations, alpha)


def _exact(matvec, b, config):
    return dense_solve(matvec, b)


def _minres(matvec, b, config):
    """MINRES for the indefinite A of an inner loop that stopped short of a minimizer."""
    return minres(matvec, b, config.cg_iterations, getattr(config, "cg_tol", 1e-10))


def _normal_cg(matvec, b, config):
    """CG on A² x = A b: positive semi-definite whatever A is, at two products per step."""
    return normal_cg(matvec, b, config.cg_iterations, getattr(config, "cg_tol", 1e-10))


def _cg_damped(matvec, b, config):
    """CG on (A + μI) x = v, μ = ``config.cg_damping`` (none on a config without it: a plain
    Betty ``Config``), with the trust region as for ``cg``: ‖v‖/λ still bounds the damped
    solution when H ⪰ 0."""
    return damped_cg(matvec, b, config.cg_iterations, getattr(config, "cg_tol", 1e-10),
                     getattr(config, "cg_damping", 0.0), radius=trust_radius(b, config))


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
    curr.hypergrad_infos = [curr.hypergrad_info]
    return implicit


SOLVERS = {
    "cg": _solve_with(_cg),
    "neumann": _solve_with(_neumann),
    "darts": darts,
    "exact": _solve_with(_exact),
    "minres": _solve_with(_minres),
    "normal-cg": _solve_with(_normal_cg),
    "cg-damped": _solve_with(_cg_damped),
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
    hypergradient.jvp_fn_mapping[key] = _solve_with(_per_system(solve))
    return key


def _per_system(solve: Callable) -> Callable:
    """A user's solver for one system (b: [n]) applied to each of the stacked systems [T, n]
    (one per task; T = 1 when tasks run one at a time), checking what it returns."""

    def batched(matvec, b, config):
        xs, infos = [], []
        for t in range(b.shape[0]):
            def one(u: torch.Tensor, t: int = t) -> torch.Tensor:
                stacked = torch.zeros_like(b)
                stacked[t] = u
                return matvec(stacked)[t]

            out = solve(one, b[t], config)
            if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], SolveInfo)):
                raise TypeError(f"hypergradient solver {getattr(solve, '__name__', solve)!r} returned "
                                f"{type(out).__name__}; it must return (x, SolveInfo)")
            xs.append(out[0])
            infos.append(out[1])
        return torch.stack(xs), infos

    batched.__name__ = getattr(solve, "__name__", "solver")
    return batched


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
