"""Independent references for meta-gradients: plain autograd, no Betty, no project solver.

Every function takes a model (θ = its parameters) and a list of ``Task`` objects and returns
the meta-gradient averaged over tasks, as a list shaped like ``model.parameters()``.
"""

from __future__ import annotations

from typing import List

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
                  weight_decay: float = 0.0) -> List[torch.Tensor]:
    """iMAML's meta-gradient (I + H/λ)⁻¹ ∇φ L_query(φ) at the adapted φ, with the support-loss
    Hessian H (+ wd·I with inner weight decay) formed densely by
    ``torch.autograd.functional.hessian`` and solved directly."""
    names, theta = zip(*model.named_parameters())
    shapes = [t.shape for t in theta]
    sizes = [t.numel() for t in theta]

    def unflatten(flat):
        return [c.view(s) for c, s in zip(flat.split(sizes), shapes)]

    total = [torch.zeros_like(t) for t in theta]
    for task in tasks:
        phi = proximal_adapt(model, task, inner_lr, steps, lam, kind, weight_decay)
        flat_phi = torch.cat([p.detach().reshape(-1) for p in phi])
        hessian = torch.autograd.functional.hessian(
            lambda f: _loss(model, names, unflatten(f), task.support_x, task.support_y, kind), flat_phi)
        query_grad = torch.autograd.grad(_loss(model, names, phi, task.query_x, task.query_y, kind), phi)
        v = torch.cat([g.reshape(-1) for g in query_grad])
        eye = torch.eye(v.numel(), dtype=v.dtype)
        g = torch.linalg.solve(eye + (hessian + weight_decay * eye) / lam, v)
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
