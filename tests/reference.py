"""Independent references for meta-gradients: plain autograd, no Betty, no project solver.

Every function takes a model (θ = its parameters) and a list of ``Task`` objects and returns
the meta-gradient averaged over tasks, as a list shaped like ``model.parameters()``.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch.func import functional_call

from imaml.metrics import task_loss
from imaml.models import support_statistics


def _loss(model, names, params, x, y, kind):
    return task_loss(kind, functional_call(model, dict(zip(names, params)), (x,)), y)


def _query_loss(model, names, params, task, kind, episodic: bool = False):
    """The query loss; with episodic BatchNorm the support set supplies the statistics."""
    if not episodic:
        return _loss(model, names, params, task.query_x, task.query_y, kind)
    rows = task.support_x.shape[0]
    with support_statistics(model, rows):
        out = functional_call(model, dict(zip(names, params)), (torch.cat([task.support_x, task.query_x]),))
    return task_loss(kind, out[rows:], task.query_y)


def unrolled_maml(model, tasks, inner_lr: float, steps: int, kind: str, first_order: bool = False,
                  momentum: float = 0.0, weight_decay: float = 0.0, episodic: bool = False) -> List[torch.Tensor]:
    """MAML by differentiating through ``steps`` SGD steps (second order unless first_order),
    optionally with heavy-ball momentum (first buffer = first gradient, as torch's SGD) and
    weight decay added to the gradient."""
    names, theta = zip(*model.named_parameters())
    total = [torch.zeros_like(t) for t in theta]
    for task in tasks:
        phi, velocity = list(theta), None
        for _ in range(steps):
            loss = _loss(model, names, phi, task.support_x, task.support_y, kind)
            grads = torch.autograd.grad(loss, phi, create_graph=not first_order)
            grads = [g + weight_decay * p for g, p in zip(grads, phi)]
            velocity = grads if velocity is None else [momentum * v + g for v, g in zip(velocity, grads)]
            phi = [p - inner_lr * v for p, v in zip(phi, velocity if momentum else grads)]
        query = _query_loss(model, names, phi, task, kind, episodic)
        for acc, g in zip(total, torch.autograd.grad(query, theta)):
            acc.add_(g / len(tasks))
    return total


def proximal_adapt(model, task, inner_lr: float, steps: int, lam: float, kind: str,
                   weight_decay: float = 0.0) -> List[torch.Tensor]:
    """iMAML's inner loop: SGD on L_support(φ) + λ/2‖φ − θ‖² (+ wd/2‖φ‖²) from φ = θ (detached)."""
    names, theta = zip(*model.named_parameters())
    theta = [t.detach() for t in theta]
    phi = [t.clone().requires_grad_() for t in theta]
    for _ in range(steps):
        loss = _loss(model, names, phi, task.support_x, task.support_y, kind)
        loss = loss + 0.5 * lam * sum((p - t).pow(2).sum() for p, t in zip(phi, theta))
        loss = loss + 0.5 * weight_decay * sum(p.pow(2).sum() for p in phi)
        grads = torch.autograd.grad(loss, phi)
        phi = [(p - inner_lr * g).detach().requires_grad_() for p, g in zip(phi, grads)]
    return phi


def implicit_maml(model, tasks, inner_lr: float, steps: int, lam: float, kind: str,
                  weight_decay: float = 0.0, damping: float = 0.0, matrices: Optional[list] = None
                  ) -> List[torch.Tensor]:
    """iMAML's meta-gradient (I + H/λ)⁻¹ ∇φ L_query(φ) at the adapted φ, with the support-loss
    Hessian H (+ wd·I with inner weight decay) formed densely by
    ``torch.autograd.functional.hessian`` and solved directly. ``damping`` μ adds μI to H, as
    the cg-damped solver does: λ (H + λI + μI)⁻¹ ∇φ L_query. Each task's A = H + λI is appended
    to ``matrices`` if given (to check whether a test's system is positive definite or not)."""
    _, theta = zip(*model.named_parameters())
    shapes = [t.shape for t in theta]
    sizes = [t.numel() for t in theta]

    def unflatten(flat):
        return [c.view(s) for c, s in zip(flat.split(sizes), shapes)]

    total = [torch.zeros_like(t) for t in theta]
    for task in tasks:
        hessian, v = _adapted_system(model, task, inner_lr, steps, lam, kind, weight_decay)
        eye = torch.eye(v.numel(), dtype=v.dtype)
        if matrices is not None:
            matrices.append(hessian + lam * eye)
        g = torch.linalg.solve(eye + (hessian + (weight_decay + damping) * eye) / lam, v)
        for acc, part in zip(total, unflatten(g)):
            acc.add_(part / len(tasks))
    return total


def _adapted_system(model, task, inner_lr: float, steps: int, lam: float, kind: str, weight_decay: float):
    """(H, v) at the φ ``proximal_adapt`` reaches: the support-loss Hessian and ∇φ L_query, flat."""
    names, theta = zip(*model.named_parameters())
    shapes = [t.shape for t in theta]
    sizes = [t.numel() for t in theta]
    phi = proximal_adapt(model, task, inner_lr, steps, lam, kind, weight_decay)
    flat_phi = torch.cat([p.detach().reshape(-1) for p in phi])
    hessian = torch.autograd.functional.hessian(
        lambda f: _loss(model, names, [c.view(s) for c, s in zip(f.split(sizes), shapes)], task.support_x,
                        task.support_y, kind), flat_phi)
    query_grad = torch.autograd.grad(_loss(model, names, phi, task.query_x, task.query_y, kind), phi)
    return hessian, torch.cat([g.reshape(-1) for g in query_grad])


def _start(names, theta, task, kind, zero_head):
    """φ₀ = θ, except entries named in ``zero_head``: zeros with the task's classes as rows."""
    ways = int(task.support_y.max()) + 1 if kind == "classification" else None
    return [torch.zeros((ways or t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device, requires_grad=True)
            if n in zero_head else t for n, t in zip(names, theta)]


def unrolled_general(model, tasks, steps: int, kind: str, lrs, wrt=None, first_order: bool = False,
                     adapted=None, zero_head=(), lam: float = 0.0, momentum: float = 0.0,
                     weight_decay: float = 0.0) -> List[torch.Tensor]:
    """Unrolled adaptation by plain autograd, with the extensions' options; returns the mean
    over tasks of d L_query / d ``wrt`` (default θ; ``None`` gradients as zeros).

    ``lrs``: a float, or one tensor per parameter (Meta-SGD's α, may be in ``wrt``).
    ``adapted``: names of the parameters the inner steps update (ANIL: the head); the others
    stay θ's own tensors. ``zero_head``: names that start every task at zeros, as many rows
    as the task has classes. ``lam``: adds λ/2‖φ_a − φ₀‖² over the adapted entries (the
    proximal term, anchored at the start: θ, or zero for a zero head). ``momentum``,
    ``weight_decay``: as torch's SGD (first velocity = first gradient), per task."""
    names, theta = zip(*model.named_parameters())
    wrt = list(theta) if wrt is None else list(wrt)
    step_sizes = list(lrs) if isinstance(lrs, (list, tuple)) else [lrs] * len(theta)
    total = [torch.zeros_like(t) for t in wrt]
    for task in tasks:
        phi = _start(names, theta, task, kind, zero_head)
        anchor = [p.detach() if n in zero_head else p for n, p in zip(names, phi)]
        idx = [i for i, n in enumerate(names) if adapted is None or n in adapted]
        velocity = {}
        for _ in range(steps):
            loss = _loss(model, names, phi, task.support_x, task.support_y, kind)
            if lam:
                loss = loss + 0.5 * lam * sum((phi[i] - anchor[i]).pow(2).sum() for i in idx)
            grads = torch.autograd.grad(loss, [phi[i] for i in idx], create_graph=not first_order)
            for i, g in zip(idx, grads):
                g = g + weight_decay * phi[i]
                if momentum:
                    g = velocity[i] = g if i not in velocity else momentum * velocity[i] + g
                phi[i] = phi[i] - step_sizes[i] * g
        query = _loss(model, names, phi, task.query_x, task.query_y, kind)
        for acc, g in zip(total, torch.autograd.grad(query, wrt, allow_unused=True)):
            if g is not None:
                acc.add_(g / len(tasks))
    return total


def implicit_general(model, tasks, inner_lr: float, steps: int, lam: float, kind: str, adapted=None,
                     zero_head=(), lam_by_name=None) -> List[torch.Tensor]:
    """The implicit meta-gradient with dense matrices, for a Lower problem over the adapted
    entries φ_a (the others are θ's own): g(φ_a, θ) = L_support + λ/2‖φ_a − φ₀(θ)‖², φ₀ = θ_a
    or zero (``zero_head``), λ per parameter name where ``lam_by_name`` says (``--head-lam``).
    At φ_a after ``steps`` proximal SGD steps, the total derivative of L_query(φ_a(θ), θ) by
    the implicit function theorem:

        dL/dθ = ∂L/∂θ (direct) − Jᵀ A⁻¹ ∇φ_a L,   A = ∂²g/∂φ_a² (dense Hessian),
        J = ∂(∇φ_a g)/∂θ (dense Jacobian)."""
    names, theta = zip(*model.named_parameters())
    theta = [t.detach() for t in theta]
    shapes, sizes = [t.shape for t in theta], [t.numel() for t in theta]
    total = [torch.zeros_like(t) for t in theta]
    for task in tasks:
        start = [p.detach() for p in _start(names, theta, task, kind, zero_head)]
        idx = [i for i, n in enumerate(names) if adapted is None or n in adapted]
        a_shapes = [start[i].shape for i in idx]
        a_sizes = [start[i].numel() for i in idx]

        def assemble(flat_a, th):
            phi = list(th)
            for i, part, shape in zip(idx, flat_a.split(a_sizes), a_shapes):
                phi[i] = part.view(shape)
            return phi

        def anchor(th):
            return torch.cat([(start[i] if names[i] in zero_head else th[i]).reshape(-1) for i in idx])

        weights = torch.cat([torch.full((size,), (lam_by_name or {}).get(names[i], lam), dtype=start[i].dtype)
                             for i, size in zip(idx, a_sizes)])

        def g(flat_a, th):
            loss = _loss(model, names, assemble(flat_a, th), task.support_x, task.support_y, kind)
            return loss + 0.5 * (weights * (flat_a - anchor(th)).pow(2)).sum()

        flat_a = torch.cat([start[i].reshape(-1) for i in idx])
        for _ in range(steps):  # the same proximal SGD as the engine
            flat_a = flat_a.detach().requires_grad_()
            flat_a = flat_a - inner_lr * torch.autograd.grad(g(flat_a, theta), flat_a)[0]
        flat_a = flat_a.detach().requires_grad_()
        flat_theta = torch.cat([t.reshape(-1) for t in theta]).requires_grad_()

        def unflat(f):
            return [c.view(s) for c, s in zip(f.split(sizes), shapes)]

        hessian = torch.autograd.functional.hessian(lambda f: g(f, theta), flat_a)
        jacobian = torch.autograd.functional.jacobian(
            lambda th: torch.autograd.grad(g(flat_a, unflat(th)), flat_a, create_graph=True)[0], flat_theta)
        query = _loss(model, names, assemble(flat_a, unflat(flat_theta)), task.query_x, task.query_y, kind)
        v, direct = torch.autograd.grad(query, [flat_a, flat_theta], allow_unused=True)
        direct = torch.zeros_like(flat_theta) if direct is None else direct
        grad = direct - jacobian.T @ torch.linalg.solve(hessian, v)
        for acc, part in zip(total, unflat(grad.detach())):
            acc.add_(part / len(tasks))
    return total


def relative_error(a: List[torch.Tensor], b: List[torch.Tensor]) -> float:
    fa = torch.cat([t.reshape(-1) for t in a])
    fb = torch.cat([t.reshape(-1) for t in b])
    return ((fa - fb).norm() / fb.norm()).item()


def engine_meta_gradient(engine):
    """One meta-step of ``engine``; returns (the averaged meta-gradient Betty computed, the
    tasks it used). θ is left unchanged: the Upper optimizer step is intercepted."""
    captured = {}
    upper = engine.upper

    def capture(*args, **kwargs):  # a parameter with no meta-gradient (None) counts as zeros
        captured["grads"] = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                             for p in upper.trainable_parameters()]

    upper.optimizer_step = capture
    try:
        engine.train()
        engine.train_step()
    finally:
        del upper.optimizer_step
    batch = engine.env.batch
    return captured["grads"], [batch.task(i) for i in range(batch.num_tasks)]
