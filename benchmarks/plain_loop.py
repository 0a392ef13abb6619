"""The same meta-learning math as a hand-written per-task PyTorch loop: no Betty, no engine.

What a careful user would write without a framework; the benchmark measures the engine's
overhead against it. Per meta-batch of T tasks, for each task:

- MAML: K differentiable SGD steps from φ = θ on the support loss, then the query loss / T
  backpropagated to θ through all of them;
- iMAML: K SGD steps on L_support(φ) + λ/2‖φ − θ‖² from φ = θ, then the implicit
  meta-gradient (I + H/λ)⁻¹ ∇φ L_query / T by ``cg_steps`` conjugate-gradient iterations
  on (H + λI) x = v with Hessian-vector products, times λ;

then one Adam step on θ. Same math as the engine with ``--no-cg-trust-region`` and a CG
that runs all its iterations (the benchmark checks that it did).
"""

from __future__ import annotations

from typing import List

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

__all__ = ["PlainLoop"]


class PlainLoop:
    def __init__(self, algo: str, model: torch.nn.Module, source, meta_batch_size: int, inner_steps: int,
                 inner_lr: float, meta_lr: float, lam: float, cg_steps: int, seed: int, device,
                 dtype: torch.dtype = torch.float32):
        self.algo, self.model, self.source = algo, model, source
        self.meta_batch_size, self.inner_steps, self.inner_lr = meta_batch_size, inner_steps, inner_lr
        self.lam, self.cg_steps, self.device, self.dtype = lam, cg_steps, device, dtype
        self.names = [name for name, _ in model.named_parameters()]
        self.theta = list(model.parameters())
        self.optimizer = torch.optim.Adam(self.theta, lr=meta_lr)
        self.rng = np.random.default_rng([seed, 0])

    def loss(self, params: List[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(self.model, dict(zip(self.names, params)), (x,)), y)

    def meta_step(self) -> None:
        batch = self.source.sample(self.rng, self.meta_batch_size).to(self.device, self.dtype)
        self.optimizer.zero_grad(set_to_none=True)
        for i in range(batch.num_tasks):
            task = (batch.support_x[i], batch.support_y[i], batch.query_x[i], batch.query_y[i])
            grads = self.maml_task(*task) if self.algo == "maml" else self.imaml_task(*task)
            for p, g in zip(self.theta, grads):
                p.grad = g / batch.num_tasks if p.grad is None else p.grad + g / batch.num_tasks
        self.optimizer.step()

    def maml_task(self, xs, ys, xq, yq) -> List[torch.Tensor]:
        phi = list(self.theta)
        for _ in range(self.inner_steps):
            grads = torch.autograd.grad(self.loss(phi, xs, ys), phi, create_graph=True)
            phi = [p - self.inner_lr * g for p, g in zip(phi, grads)]
        return list(torch.autograd.grad(self.loss(phi, xq, yq), self.theta))

    def proximal_loss(self, phi, theta, xs, ys) -> torch.Tensor:
        return self.loss(phi, xs, ys) + 0.5 * self.lam * sum((p - t).pow(2).sum() for p, t in zip(phi, theta))

    def imaml_task(self, xs, ys, xq, yq) -> List[torch.Tensor]:
        theta = [t.detach() for t in self.theta]
        phi = [t.clone().requires_grad_() for t in theta]
        for _ in range(self.inner_steps):
            grads = torch.autograd.grad(self.proximal_loss(phi, theta, xs, ys), phi)
            with torch.no_grad():
                for p, g in zip(phi, grads):
                    p.sub_(self.inner_lr * g)
        v = torch.autograd.grad(self.loss(phi, xq, yq), phi)
        grads = torch.autograd.grad(self.proximal_loss(phi, theta, xs, ys), phi, create_graph=True)
        flat_grad = torch.cat([g.reshape(-1) for g in grads])

        def hvp(u: torch.Tensor) -> torch.Tensor:
            return torch.cat([h.reshape(-1) for h in torch.autograd.grad(flat_grad, phi, u, retain_graph=True)])

        b = torch.cat([g.reshape(-1) for g in v])
        x, r = torch.zeros_like(b), b.clone()
        p, rs = r.clone(), r.dot(r)
        for _ in range(self.cg_steps):  # textbook CG on (H + λI) x = v
            ap = hvp(p)
            alpha = rs / p.dot(ap)
            x, r = x + alpha * p, r - alpha * ap
            rs_new = r.dot(r)
            p, rs = r + (rs_new / rs) * p, rs_new
        return [self.lam * part.view_as(t) for part, t in zip(x.split([t.numel() for t in theta]), theta)]
