"""The implicit-gradient adapter: a linear solver becomes a Betty hypergradient function.

For a lower problem φ*(θ) = argmin_φ g(φ, θ) and an upper loss f(φ*), the implicit
function theorem gives

    df/dθ = −(∂²g/∂θ∂φ) · A⁻¹ · ∇φ f,    A = ∂²g/∂φ²  (the Hessian of the lower objective).

For iMAML, g = L_support(φ) + λ/2·‖φ − θ‖², so A = H + λI, −∂²g/∂θ∂φ = λI and

    df/dθ = λ (H + λI)⁻¹ ∇φ f = (I + H/λ)⁻¹ ∇φ f        (Rajeswaran et al., 2019, eq. 6).

``implicit_gradient(solve)`` gives the solver the lower objective's Hessian-vector product and
applies the cross term with one more autograd call, so it serves any lower objective, not just
the proximal one. The contract of ``solve(matvec, b, settings) -> (x, infos)``: b and x are
[T, n], one row per task of the inner loop (T = 1 when tasks run one at a time), ``matvec``
maps [T, n] to [T, n], and ``infos`` is a list of one ``SolveInfo`` per row.

The core works on flat vectors (one ``torch.cat``), so there is no Python loop over
parameters inside the solver iterations.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Callable, Optional, Sequence

import torch

from imaml.metrics import global_norm
from imaml.solvers.base import SolveInfo, converged_within, measured, relative_residual
from imaml.solvers.contract import ImplicitLowerProblem

__all__ = ["implicit_gradient", "flat"]


def flat(tensors: Sequence[torch.Tensor], tasks: Optional[int] = None) -> torch.Tensor:
    """One flat vector, or with ``tasks`` one row per task ([T, n]) of task-stacked tensors."""
    if tasks is None:
        return torch.cat([t.reshape(-1) for t in tensors])
    return torch.cat([t.reshape(tasks, -1) for t in tensors], dim=1)


def _lower_grad(curr: ImplicitLowerProblem) -> tuple:
    """∇φ g at the current lower parameters, with its graph (for HVPs and the cross term), as
    [T, n]: the lower objective of T stacked tasks is the sum of theirs, so row t is ∇φ_t g_t."""
    loss = curr.inner_objective()
    params = list(curr.trainable_parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grads = torch.autograd.grad(loss, params, create_graph=True)
    return flat(grads, curr.num_tasks), params


def _cross_term(flat_grad: torch.Tensor, x: torch.Tensor, curr: ImplicitLowerProblem, prev) -> tuple:
    """−(∂/∂θ)(∇φ g · x): the cross term applied to the solve's result, summed over tasks,
    and each task's norm ([T] floats). A Lower problem whose objective reads θ through per-task
    views ([T, ...]) names them in ``task_meta_parameters``; they give the per-task terms in the
    same single backward pass. Otherwise θ is read as it is, by one task."""
    per_task = curr.task_meta_parameters
    inputs = list(per_task) if per_task is not None else list(prev.trainable_parameters())
    grads = torch.autograd.grad(flat_grad, inputs, grad_outputs=x, allow_unused=True)
    grads = [None if g is None else -g for g in grads]
    if per_task is None:
        return grads, [float(global_norm(grads))]
    norms = torch.stack([g.reshape(len(x), -1).norm(dim=1) for g in grads if g is not None]).norm(dim=0)
    return [None if g is None else g.sum(0) for g in grads], norms.tolist()


def _check(solve: Callable, out, tasks: int) -> tuple:
    """``out`` as the contract has it, (x [T, n], T SolveInfo), or a TypeError naming the solver."""
    infos = out[1] if isinstance(out, tuple) and len(out) == 2 else None
    if not (isinstance(infos, list) and len(infos) == tasks and all(isinstance(i, SolveInfo) for i in infos)):
        raise TypeError(f"hypergradient solver {getattr(solve, '__name__', solve)!r} returned "
                        f"{type(out).__name__}; it must return (x, SolveInfo) for each of the {tasks} systems: "
                        f"x [T, n] and a list of T SolveInfo")
    return out


def _closed_form(x: torch.Tensor, matvec: Callable, b: torch.Tensor) -> tuple:
    """A Lower problem's own exact solve ``x`` (``solve_exactly(b)``, e.g. the head's closed
    form), with its residual measured by one autograd Hessian-vector product: the check that
    the closed form is A's."""
    infos = measured("exact", matvec, x, b, torch.ones(len(b), dtype=torch.long), torch.ones(len(b), dtype=torch.bool),
                     1e-6, False)[1]
    return x, infos


def _scaled_solve(solve: Callable, matvec: Callable, b: torch.Tensor, settings, scale: torch.Tensor) -> tuple:
    """A = H + Λ with λ differing by parameter group (``--head-lam``): solve S A S y = S b with
    S = Λ^(-1/2), whose proximal part is I (the solver's λ is then 1), to the tolerance that
    bounds A's own relative residual by ``cg_tol``, and return x = S y with each residual
    measured on A itself, the system the meta-gradient needs."""
    tol = settings.cg_tol
    spread = float(scale.max() / scale.min())  # ‖Ax − b‖/‖b‖ ≤ spread·‖S(Ax − b)‖/‖Sb‖
    y, infos = solve(lambda u: scale * matvec(scale * u), scale * b,
                     replace(settings, lam=1.0, head_lam=None, cg_tol=tol / spread))
    x = scale * y
    residual = relative_residual(matvec(x) - b, b.norm(dim=1)).tolist()
    for info, res in zip(infos, residual):
        info.residual, info.converged = res, info.converged and converged_within(True, res, tol)
    return x, infos


def implicit_gradient(solve: Callable, structured: bool = False) -> Callable:
    """Turn ``solve(matvec, b, settings) -> (x, infos)`` (b, x: [T, n]) into a Betty jvp function.

    ``curr`` is the Lower problem: the adapter reads and sets only what ``ImplicitLowerProblem``
    declares (``contract.py``). It gets ``hypergrad_infos`` (one ``SolveInfo`` per task, its
    ``norm`` the task's hypergradient norm) and ∇g(φ_K) per task (``record_final_gradient``).
    ``structured``: an exact solver, which a Lower problem's ``solve_exactly`` (a closed form of
    the same A⁻¹b) replaces where it has one."""

    def jvp(vector, curr: ImplicitLowerProblem, prev):
        flat_grad, params = _lower_grad(curr)
        tasks = curr.num_tasks
        curr.record_final_gradient(flat_grad)  # the inner loop's stationarity, at no extra cost

        def matvec(u: torch.Tensor) -> torch.Tensor:
            return flat(torch.autograd.grad(flat_grad, params, grad_outputs=u, retain_graph=True), tasks)

        with torch.no_grad():
            b = flat(vector, tasks).detach()
            closed = curr.solve_exactly(b) if structured else None
        diagonal = curr.proximal_diagonal() if closed is None else None
        with torch.no_grad():
            if closed is not None:
                out = _closed_form(closed, matvec, b)
            elif diagonal is not None:
                out = _scaled_solve(solve, matvec, b, curr.settings, diagonal.rsqrt())
            else:
                out = solve(matvec, b, curr.settings)
            x, infos = _check(solve, out, tasks)
        implicit, norms = _cross_term(flat_grad, x, curr, prev)
        for info, norm in zip(infos, norms):
            info.norm = norm
        curr.hypergrad_infos = infos  # one per task
        return implicit

    jvp.__name__ = solve.__name__
    return jvp
