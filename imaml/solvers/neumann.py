"""The Neumann series for A⁻¹b (``--hypergrad neumann``), with its step from power iteration."""

from __future__ import annotations

import math
from typing import Optional

import torch

from imaml.solvers.base import MatVec, SolveInfo, as_given, as_systems, dot

__all__ = ["neumann_series", "largest_eigenvalue"]


def largest_eigenvalue(matvec: MatVec, like: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """λ_max of symmetric PSD A by power iteration from a fixed start (no global RNG use);
    ``like`` is [n] or [T, n], and the result has one estimate per system ([] or [T])."""
    matvec, like, single = as_systems(matvec, like)
    gen = torch.Generator(device="cpu").manual_seed(0)
    start = torch.randn(like.shape[1], generator=gen, dtype=like.dtype).to(like.device)
    v = (start / start.norm()).expand_as(like).clone()
    estimate = torch.zeros(like.shape[0], dtype=like.dtype, device=like.device)
    live = torch.ones_like(estimate, dtype=torch.bool)
    for _ in range(iterations):
        av = matvec(v)
        estimate = torch.where(live, dot(v, av), estimate)
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
    matvec, b, single = as_systems(matvec, b)
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
    return as_given(x, infos, single)
