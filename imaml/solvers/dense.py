"""The exact solve from the dense matrix (``--hypergrad exact``): tests and tiny models."""

from __future__ import annotations

import torch

from imaml.solvers.base import MatVec, SolveInfo, as_given, as_systems

__all__ = ["dense_solve", "EXACT_MAX_PARAMS"]

EXACT_MAX_PARAMS = 10_000


def dense_solve(matvec: MatVec, b: torch.Tensor) -> tuple:
    """Exact A⁻¹ b from the dense matrix (n Hessian-vector products); tiny models only."""
    matvec, b, single = as_systems(matvec, b)
    n = b.shape[1]
    if n > EXACT_MAX_PARAMS:
        from imaml.errors import UsageError

        raise UsageError(f"--hypergrad exact: the model has {n} parameters; the dense solve is for "
                         f"<= {EXACT_MAX_PARAMS} (tests, diagnostics); use --hypergrad cg")
    eye = torch.eye(n, dtype=b.dtype, device=b.device)
    a = torch.stack([matvec(e.expand_as(b)) for e in eye], dim=2)  # [T, n, n], column i = A e_i
    a = 0.5 * (a + a.transpose(1, 2))  # symmetric up to rounding
    x = torch.linalg.solve(a, b)
    b_norm = b.norm(dim=1)
    residual = torch.where(b_norm > 0, (a @ x[:, :, None])[:, :, 0].sub(b).norm(dim=1) / torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm)),
                           torch.zeros_like(b_norm))
    infos = [SolveInfo("exact", 1, res, True) for res in residual.tolist()]
    return as_given(x, infos, single)
