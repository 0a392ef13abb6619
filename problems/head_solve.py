"""The head's linear system in closed form: x = A⁻¹b for A = ∂²g/∂φ_h² + μI, exactly, for T tasks.

For a linear head z_i = Z f̃_i (Z = [W | b], f̃_i = [f_i; 1]) on fixed features, the support loss's
Hessian is Jᵀ D J: J maps Z to every example's outputs, D = blockdiag(S_i) holds the loss's
curvature in each example's outputs (softmax cross-entropy: (diag p_i − p_i p_iᵀ)/N; mean squared
error: 2/(N·O)·I). So A = μI + JᵀDJ, of size n = outputs·(F + 1), has a data part of rank at
most m = N·outputs, and

    A⁻¹ = (1/μ)·(I − Jᵀ (μI + D J Jᵀ)⁻¹ D J)          (Woodbury; J Jᵀ = [f̃_iᵀ f̃_j] ⊗ I),

an m×m solve per task instead of n×n; where m > n the dense A is solved instead. Either way one
batched ``torch.linalg.solve`` over the meta-batch replaces an iterative solver's dozens of
Hessian-vector products.
"""

from __future__ import annotations

from typing import List

import torch

__all__ = ["solve_head_system", "curvature"]


def curvature(kind: str, outputs: torch.Tensor) -> torch.Tensor:
    """S_i, the support loss's Hessian in example i's outputs: [T, N, O, O] (the 1/N inside)."""
    tasks, examples, width = outputs.shape
    if kind == "classification":
        p = torch.softmax(outputs, dim=-1)
        return (torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)) / examples
    eye = torch.eye(width, dtype=outputs.dtype, device=outputs.device)
    return (2.0 / (examples * width) * eye).expand(tasks, examples, width, width)


def solve_head_system(features: torch.Tensor, head: List[torch.Tensor], kind: str, mu: float,
                      b: torch.Tensor) -> torch.Tensor:
    """x [T, n] with (∂²L_support/∂φ_h² + μI) x = b, at the head ``head`` ([W [T, O, F]] or
    [W, bias [T, O]]) on support ``features`` [T, N, F]; b and x flattened as the head's
    parameters are (W row-major, then the bias)."""
    tasks, examples, width = features.shape
    weight = head[0]
    outputs = weight.shape[1]
    with_bias = len(head) > 1
    ones = torch.ones(tasks, examples, 1, dtype=features.dtype, device=features.device)
    f = torch.cat([features, ones], dim=2) if with_bias else features  # f̃ [T, N, F1]
    z = torch.cat([weight, head[1].unsqueeze(-1)], dim=2) if with_bias else weight  # Z [T, O, F1]
    s = curvature(kind, torch.bmm(f, z.transpose(1, 2)))  # [T, N, O, O]
    v = _as_matrix(b, tasks, outputs, width, with_bias)  # [T, O, F1]
    rank, size = examples * outputs, outputs * f.shape[2]
    if rank <= size:  # Woodbury: an m×m system
        jv = torch.einsum("tof,tnf->tno", v, f)
        djv = torch.einsum("tnab,tnb->tna", s, jv).reshape(tasks, rank)
        gram = torch.bmm(f, f.transpose(1, 2))  # [T, N, N]
        dg = torch.einsum("tiab,tij->tiajb", s, gram).reshape(tasks, rank, rank)
        eye = torch.eye(rank, dtype=b.dtype, device=b.device)
        w = torch.linalg.solve(mu * eye + dg, djv.unsqueeze(-1)).reshape(tasks, examples, outputs)
        x = (v - torch.einsum("tno,tnf->tof", w, f)) / mu
    else:  # dense: an n×n system
        a = torch.einsum("tnab,tnf,tng->tafbg", s, f, f).reshape(tasks, size, size)
        a = a + mu * torch.eye(size, dtype=b.dtype, device=b.device)
        x = torch.linalg.solve(a, v.reshape(tasks, size, 1)).reshape(tasks, outputs, -1)
    return _as_flat(x, width, with_bias)


def _as_matrix(b: torch.Tensor, tasks: int, outputs: int, width: int, with_bias: bool) -> torch.Tensor:
    """[T, n] (W flat, then bias) → [T, O, F1] (Z = [W | bias])."""
    weight = b[:, :outputs * width].reshape(tasks, outputs, width)
    if not with_bias:
        return weight
    return torch.cat([weight, b[:, outputs * width:].unsqueeze(-1)], dim=2)


def _as_flat(x: torch.Tensor, width: int, with_bias: bool) -> torch.Tensor:
    tasks = x.shape[0]
    if not with_bias:
        return x.reshape(tasks, -1)
    return torch.cat([x[..., :width].reshape(tasks, -1), x[..., width]], dim=1)
