"""What every linear solver shares: the ``SolveInfo`` it reports and the per-system helpers.

A solver takes b as [n] (one system) or [T, n] (T independent systems, one per task of a
meta-batch, whose matrix is block-diagonal), with ``matvec`` mapping the same shape to itself.
All scalars (step sizes, stopping decisions) are per system, so solving T systems at once gives
what T separate solves give, with one host sync per iteration.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["MatVec", "SolveInfo", "as_systems", "as_given", "dot", "measured", "converged_within",
           "relative_residual", "nonzero", "where_rows", "check_budget"]

MatVec = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SolveInfo:
    """What a solve did, for the logs: the relative residual ‖Ax − v‖/‖v‖ it ended with."""

    solver: str
    iterations: int
    residual: float
    converged: bool
    norm: float = float("nan")  # ‖hypergradient‖, filled in by the Betty adapter
    boundary: bool = False  # CG stopped on negative curvature or at its trust radius
    damped_residual: float = float("nan")  # cg-damped: ‖(A + μI)x − v‖/‖v‖, the system it solved



def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of [T, n] tensors: [T]."""
    return (a * b).sum(dim=1)


def as_systems(matvec: MatVec, b: torch.Tensor) -> tuple:
    """(matvec on [T, n], b as [T, n], whether b was one system [n])."""
    if b.dim() == 2:
        return matvec, b, False
    return (lambda u: matvec(u[0]).unsqueeze(0)), b.unsqueeze(0), True


def as_given(x: torch.Tensor, infos: list, single: bool) -> tuple:
    return (x[0], infos[0]) if single else (x, infos)


def measured(name: str, matvec: MatVec, x: torch.Tensor, b: torch.Tensor, steps: torch.Tensor, met: torch.Tensor,
              tol: float, single: bool) -> tuple:
    """(x, infos) with ‖Ax − b‖/‖b‖ measured by one more product, and whether it converged."""
    residual = relative_residual(matvec(x) - b, b.norm(dim=1)).tolist()
    infos = [SolveInfo(name, n, res, converged_within(ok, res, tol)) for n, res, ok in zip(steps.tolist(), residual, met.tolist())]
    return as_given(x, infos, single)


def converged_within(met: bool, measured: float, tol: float) -> bool:
    """The measured residual is ≤ tol, or the recurrence's stopping test was met and the
    measured residual agrees with it up to rounding (a factor 2)."""
    return measured <= tol or (met and measured <= 2 * tol)


def relative_residual(r: torch.Tensor, b_norm: torch.Tensor) -> torch.Tensor:
    """‖r‖/‖b‖ per row, 0 where b = 0 (x = 0 solves those exactly)."""
    return torch.where(b_norm > 0, r.norm(dim=1) / nonzero(b_norm), torch.zeros_like(b_norm))


def nonzero(t: torch.Tensor) -> torch.Tensor:
    """t with zeros replaced by ones: a safe denominator where the zero rows are masked anyway."""
    return torch.where(t == 0, torch.ones_like(t), t)


def where_rows(rows: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per system: ``new`` where ``rows`` ([T] bool) is set, else ``old`` (for [T] or [T, n])."""
    return torch.where(rows if new.dim() == 1 else rows[:, None], new, old)


def check_budget(name: str, max_steps: int, tol: float) -> None:
    """Refuse a budget the loops would misread (a negative step count runs none; NaN never stops)."""
    if not (isinstance(max_steps, numbers.Integral) and max_steps >= 0):
        raise ValueError(f"{name}: max_steps must be an integer >= 0, got {max_steps!r}")
    if not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"{name}: tol must be >= 0 and finite, got {tol!r}")
