"""Independent references for meta-gradients: plain autograd, no Betty, no project solver.

Every function takes a model (θ = its parameters) and a list of ``Task`` objects and returns
the meta-gradient averaged over tasks, as a list shaped like ``model.parameters()``.
"""

from __future__ import annotations

from typing import List

import torch
from torch.func import functional_call

from imaml.metrics import task_loss


def _loss(model, names, params, x, y, kind):
    return task_loss(kind, functional_call(model, dict(zip(names, params)), (x,)), y)


def unrolled_maml(model, tasks, inner_lr: float, steps: int, kind: str, first_order: bool = False) -> List[torch.Tensor]:
    """MAML by differentiating through ``steps`` SGD steps (second order unless first_order)."""
    names, theta = zip(*model.named_parameters())
    total = [torch.zeros_like(t) for t in theta]
    for task in tasks:
        phi = list(theta)
        for _ in range(steps):
            loss = _loss(model, names, phi, task.support_x, task.support_y, kind)
            grads = torch.autograd.grad(loss, phi, create_graph=not first_order)
            phi = [p - inner_lr * g for p, g in zip(phi, grads)]
        query = _loss(model, names, phi, task.query_x, task.query_y, kind)
        for acc, g in zip(total, torch.autograd.grad(query, theta)):
            acc.add_(g / len(tasks))
    return total


def proximal_adapt(model, task, inner_lr: float, steps: int, lam: float, kind: str) -> List[torch.Tensor]:
    """iMAML's inner loop: SGD on L_support(φ) + λ/2‖φ − θ‖² from φ = θ (detached)."""
    names, theta = zip(*model.named_parameters())
    theta = [t.detach() for t in theta]
    phi = [t.clone().requires_grad_() for t in theta]
    for _ in range(steps):
        loss = _loss(model, names, phi, task.support_x, task.support_y, kind)
        loss = loss + 0.5 * lam * sum((p - t).pow(2).sum() for p, t in zip(phi, theta))
        grads = torch.autograd.grad(loss, phi)
        phi = [(p - inner_lr * g).detach().requires_grad_() for p, g in zip(phi, grads)]
    return phi


def implicit_maml(model, tasks, inner_lr: float, steps: int, lam: float, kind: str) -> List[torch.Tensor]:
    """iMAML's meta-gradient (I + H/λ)⁻¹ ∇φ L_query(φ) at the adapted φ, with the support-loss
    Hessian H formed densely by ``torch.autograd.functional.hessian`` and solved directly."""
    names, theta = zip(*model.named_parameters())
    shapes = [t.shape for t in theta]
    sizes = [t.numel() for t in theta]

    def unflatten(flat):
        return [c.view(s) for c, s in zip(flat.split(sizes), shapes)]

    total = [torch.zeros_like(t) for t in theta]
    for task in tasks:
        phi = proximal_adapt(model, task, inner_lr, steps, lam, kind)
        flat_phi = torch.cat([p.detach().reshape(-1) for p in phi])
        hessian = torch.autograd.functional.hessian(
            lambda f: _loss(model, names, unflatten(f), task.support_x, task.support_y, kind), flat_phi)
        query_grad = torch.autograd.grad(_loss(model, names, phi, task.query_x, task.query_y, kind), phi)
        v = torch.cat([g.reshape(-1) for g in query_grad])
        eye = torch.eye(v.numel(), dtype=v.dtype)
        g = torch.linalg.solve(eye + hessian / lam, v)
        for acc, part in zip(total, unflatten(g)):
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

    def capture(*args, **kwargs):
        captured["grads"] = [p.grad.detach().clone() for p in upper.trainable_parameters()]

    upper.optimizer_step = capture
    try:
        engine.train()
        engine.train_step()
    finally:
        del upper.optimizer_step
    batch = engine.env.batch
    return captured["grads"], [batch.task(i) for i in range(batch.num_tasks)]
