"""Inner optimizers for iMAML: minimize each task's proximal objective g(φ) = L_support(φ) + λ/2·‖φ − θ‖².

The implicit meta-gradient is the theorem's only at a stationary point of g, where ∇g = 0 and
A = ∂²g/∂φ² is positive semi-definite; an inner loop that stops far from one hands the linear
solve an indefinite system and the meta-gradient is mostly noise. So every inner loop here
measures its own stationarity ‖∇g(φ_k)‖ / ‖∇g(φ_0)‖ per task, stops a task once it is within
``--inner-tol``, and the engine reports the fraction of tasks that got there.

Three ways to take a step, each a function of what the Lower problem hands over (``InnerStep``):

- ``sgd``: the run's torch SGD (with its momentum), a fixed step ``--inner-lr``;
- ``armijo``: steepest descent with a backtracking line search (Armijo's sufficient decrease),
  starting from twice the task's last accepted step, at most ``--inner-lr``: g never goes up;
- ``hessian-free``: the iMAML paper's Hessian-free optimizer (a truncated Newton method): the
  direction solves the Levenberg-Marquardt-damped system (A + μI) d = −∇g by ``--inner-cg-steps``
  of CG (Hessian-vector products only; stopped on negative curvature), then the line search
  from a full step.

All of them work on per-task rows ([T, n], one per task; T = 1 for one task), with per-task
step sizes and stopping, so a task-vectorized meta-batch takes the steps its tasks take alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from imaml.solvers.cg import conjugate_gradient
from imaml.metrics import global_norm

__all__ = ["InnerStep", "InnerLoop", "INNER_OPTIMIZERS", "rows", "add_rows_", "task_norms"]

ARMIJO_C = 1e-4  # sufficient decrease: g(φ + αd) ≤ g(φ) + c·α·∇gᵀd
SHRINK = 0.5  # backtracking factor
MAX_TRIALS = 30  # 0.5³⁰ ≈ 1e-9: a task whose every trial fails does not move this step


def rows(tensors, tasks: int) -> torch.Tensor:
    """The tensors as one row per task, [T, n] (tensors either task-stacked [T, ...] or, for
    T = 1, unstacked)."""
    return torch.cat([t.reshape(tasks, -1) for t in tensors], dim=1)


def task_norms(tensors, tasks: int) -> torch.Tensor:
    """‖·‖ of each task's part of the tensors, [T] (few operations: this runs every inner step)."""
    if tasks == 1:
        return global_norm(tensors).reshape(1)
    return rows([t.detach() for t in tensors], tasks).norm(dim=1)


def add_rows_(params: List[torch.Tensor], delta: torch.Tensor) -> None:
    """φ += delta in place, delta [T, n] laid out as ``rows`` lays out ``params``."""
    tasks, start = delta.shape[0], 0
    with torch.no_grad():
        for p in params:
            width = p.numel() // tasks
            p.add_(delta[:, start:start + width].reshape(p.shape))
            start += width


@dataclass
class InnerLoop:
    """One inner loop's stationarity record, per task ([T] tensors)."""

    tol: float
    initial: Optional[torch.Tensor] = None  # ‖∇g(φ_0)‖
    threshold: Optional[torch.Tensor] = None  # tol·‖∇g(φ_0)‖
    latest: Optional[torch.Tensor] = None  # ‖∇g(φ_k)‖ at the last measured point
    active: Optional[torch.Tensor] = None  # still moving: not yet within tol
    rate: Optional[torch.Tensor] = None  # the line search's last accepted step size
    damping: Optional[torch.Tensor] = None  # hessian-free: the Levenberg-Marquardt μ
    history: list = field(default_factory=list)  # ‖∇g(φ_k)‖ at each measurement
    trials: int = 0  # objective evaluations of the line searches

    def measure(self, norms: torch.Tensor) -> torch.Tensor:
        """Record ‖∇g(φ_k)‖ per task ([T]); stop the tasks now within tolerance; return the active
        mask. A stopped task's φ stays put, so its norm stays at or below its threshold and
        ``norms > threshold`` alone keeps it stopped (this runs at every inner step: few ops)."""
        if self.initial is None:
            self.initial, self.threshold = norms, norms * self.tol
        self.latest = norms
        self.history.append(norms)
        self.active = norms > self.threshold  # a task already at θ's stationary point never moves
        return self.active

    @property
    def moves(self) -> torch.Tensor:
        """The steps each task took: one per measurement at which it was still active."""
        return (torch.stack(self.history) > self.threshold).sum(0)

    def relative(self, latest: Optional[torch.Tensor] = None) -> torch.Tensor:
        """‖∇g(φ)‖ / ‖∇g(φ_0)‖ per task (0 where ∇g(φ_0) = 0: θ was already stationary)."""
        latest = self.latest if latest is None else latest
        safe = torch.where(self.initial > 0, self.initial, torch.ones_like(self.initial))
        return torch.where(self.initial > 0, latest / safe, torch.zeros_like(latest))

    @property
    def done(self) -> bool:
        return self.active is not None and not bool(self.active.any())


@dataclass
class InnerStep:
    """What an inner optimizer sees at φ_k.

    ``objectives()`` evaluates g per task ([T], no graph) at the current φ; ``grad`` is ∇g per
    task ([T, n]), with its graph when the optimizer asked for one (``hvp`` then gives A·u), and
    ``grads`` the same per parameter (``sgd`` takes only these; ``grad`` may then be None);
    ``values`` is g(φ_k) per task.
    """

    params: List[torch.Tensor]
    values: torch.Tensor
    grad: Optional[torch.Tensor]
    objectives: Callable[[], torch.Tensor]
    loop: InnerLoop
    lr: float
    lam: float
    cg_steps: int = 0
    hvp: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    grads: Optional[List[torch.Tensor]] = None
    # hessian-free: λ of each entry of φ ([n]) where the proximal term's λ differs by parameter
    # group (--head-lam); CG then runs on the system scaled by (λ + μ)^(-1/2)
    proximal_diagonal: Optional[torch.Tensor] = None


def line_search(step: InnerStep, direction: torch.Tensor, alpha: torch.Tensor) -> tuple:
    """Per task, the first α in alpha·{1, ½, ¼, ...} with g(φ + αd) ≤ g(φ) + c·α·∇gᵀd; moves φ
    there and returns (α, g there) ([T] each; α = 0 and g(φ) for tasks that are stopped or found
    no decrease)."""
    slope = (step.grad.detach() * direction).sum(dim=1)
    pending = step.loop.active & (slope < 0)
    alpha = torch.where(pending, alpha, torch.zeros_like(alpha))
    accepted = torch.zeros_like(alpha)
    reached = step.values  # g at the accepted point
    moved = torch.zeros_like(alpha)  # the step φ is displaced by now
    # near a minimizer the decrease sinks below rounding: accept what no evaluation can tell apart
    noise = 8 * torch.finfo(step.values.dtype).eps * step.values.abs()
    for _ in range(MAX_TRIALS):
        if not bool(pending.any()):
            break
        trial = torch.where(pending, alpha, accepted)
        add_rows_(step.params, (trial - moved)[:, None] * direction)
        moved = trial
        values = step.objectives()
        step.loop.trials += 1
        ok = pending & torch.isfinite(values) & (values <= step.values + ARMIJO_C * alpha * slope + noise)
        accepted = torch.where(ok, alpha, accepted)
        reached = torch.where(ok, values, reached)
        pending = pending & ~ok
        alpha = torch.where(pending, alpha * SHRINK, alpha)
    add_rows_(step.params, (accepted - moved)[:, None] * direction)  # tasks that never passed: back to φ_k
    return accepted, reached


def sgd(step: InnerStep, optimizer) -> None:
    """The run's torch SGD step (``--inner-lr``, ``--inner-momentum``), on the active tasks only."""
    active = step.loop.active
    frozen = None if bool(active.all()) else [p.detach().clone() for p in step.params]
    for p, g in zip(step.params, step.grads):
        p.grad = g.detach()
    optimizer.step()
    for p in step.params:
        p.grad = None
    if frozen is not None:  # stopped tasks (task-stacked rows) keep their φ: their part of the step is undone
        keep = ~active
        with torch.no_grad():
            for p, old in zip(step.params, frozen):
                p.copy_(torch.where(keep.reshape(-1, *([1] * (p.dim() - 1))), old, p))


def _steepest_start(step: InnerStep) -> torch.Tensor:
    """A steepest-descent search's first trial: min(2·the task's last accepted step, ``--inner-lr``)."""
    cap = torch.full_like(step.values, step.lr)
    return cap if step.loop.rate is None else torch.minimum(2 * step.loop.rate, cap)


def armijo(step: InnerStep, optimizer=None) -> None:
    """Steepest descent with backtracking, from min(2·last accepted step, ``--inner-lr``)."""
    start = _steepest_start(step)
    accepted, _ = line_search(step, -step.grad.detach(), start)
    step.loop.rate = torch.where(accepted > 0, accepted, start * SHRINK ** MAX_TRIALS)


def hessian_free(step: InnerStep, optimizer=None) -> None:
    """A damped truncated-Newton step (Martens, 2010): CG on (A + μI) d = −∇g, then the line
    search from α = 1, and Levenberg-Marquardt adaptation of each task's μ by how well the
    quadratic model predicted the decrease (ρ < ¼: μ × 3/2; ρ > ¾: μ × 2/3).

    Proximal objectives of real networks are not convex where the inner loop starts (A has
    eigenvalues below −λ there); the damping keeps the CG system positive definite where the
    model is trusted, CG stops on any negative curvature left, and a task whose direction is
    not a descent direction falls back to ``armijo``'s steepest-descent step. Where λ differs by
    parameter group (``proximal_diagonal``), CG is preconditioned by λ + μ: a weakly held head
    and a strongly held body then converge at the same pace."""
    loop = step.loop
    grad = step.grad.detach()
    if loop.damping is None:
        loop.damping = torch.full_like(step.values, step.lam)
    mu = loop.damping
    with torch.no_grad():
        if step.proximal_diagonal is None:
            direction, _ = conjugate_gradient(lambda u: step.hvp(u) + mu[:, None] * u, -grad, step.cg_steps, 1e-10)
        else:  # diagonally preconditioned: λ's scale per group, equalized (S(A + μI)S y = −S∇g, d = S y)
            scale = (step.proximal_diagonal[None, :] + mu[:, None]).rsqrt()
            scaled, _ = conjugate_gradient(lambda u: scale * (step.hvp(scale * u) + mu[:, None] * scale * u),
                                           -scale * grad, step.cg_steps, 1e-10)
            direction = scale * scaled
    predicted = 0.5 * (grad * direction).sum(dim=1)  # q(d) − q(0) for a CG iterate of the damped model (< 0)
    newton = predicted < 0
    direction = torch.where(newton[:, None], direction, -grad)
    steepest = _steepest_start(step)
    accepted, after = line_search(step, direction, torch.where(newton, torch.ones_like(steepest), steepest))
    full = newton & (accepted == 1)  # ρ: the decrease the full step made over the one its model predicted
    rho = (after - step.values) / torch.where(newton, predicted, -torch.ones_like(predicted))
    loop.damping = torch.where(newton & (~full | (rho < 0.25)), mu * 1.5,
                               torch.where(full & (rho > 0.75), mu / 1.5, mu))
    loop.rate = torch.where(~newton & (accepted > 0), accepted, steepest)


INNER_OPTIMIZERS = {"sgd": sgd, "armijo": armijo, "hessian-free": hessian_free}
NEEDS_HVP = {"hessian-free"}
