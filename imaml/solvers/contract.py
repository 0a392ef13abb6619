"""The contract between a Lower problem and the implicit-gradient adapter (``implicit.py``): all
that ``implicit_gradient`` reads or sets of the Lower problem, and nothing else. A Lower problem
of ``--algo imaml`` (``problems.lower.ImplicitLower``, or a user's class) is checked against it
once, when a run is built (``missing_members``), so that a missing piece is one line then, not an
AttributeError inside a solve.

The Upper problem ``prev`` gives θ: ``prev.trainable_parameters()``.
"""

from __future__ import annotations

from typing import List, Optional, Protocol, Sequence, runtime_checkable

import torch

from imaml.config import RunConfig

__all__ = ["ImplicitLowerProblem", "MEMBERS", "missing_members"]


@runtime_checkable
class ImplicitLowerProblem(Protocol):
    """What the adapter needs of a Lower problem φ*(θ) = argmin_φ g(φ, θ)."""

    settings: RunConfig  # the run's settings the solvers read: cg_steps, cg_tol, lam, ... (imaml.config)
    num_tasks: int  # T: the tasks stacked along dim 0 of φ (1: one task, φ as it is)
    task_meta_parameters: Optional[Sequence[torch.Tensor]]  # per-task views of θ that g read ([T, ...]), or None
    hypergrad_infos: Sequence  # set by the adapter: one SolveInfo per task, its norm the task's hypergradient's

    def trainable_parameters(self) -> Sequence[torch.Tensor]:
        """φ: what the inner loop adapted and the solve differentiates."""

    def inner_objective(self) -> torch.Tensor:
        """g at the current φ on the inner loop's last batch, with its graph to φ and θ (stacked:
        the sum of the tasks' g). Running statistics must not move (``imaml.models.scratch_buffers``)."""

    def record_final_gradient(self, grad_rows: torch.Tensor) -> None:
        """∇φ g at the adapted φ, [T, n], which the solve computes anyway: the inner loop's
        stationarity at no extra cost (a Lower problem that does not measure it ignores it)."""

    def proximal_diagonal(self) -> Optional[torch.Tensor]:
        """The proximal weight of each entry of one task's φ, [n], where it is not one λ
        (the solve is then preconditioned by it); None where one λ holds everywhere."""

    def solve_exactly(self, b: torch.Tensor) -> Optional[torch.Tensor]:
        """A⁻¹b in closed form, [T, n], for ``--hypergrad exact``; None where there is none (the
        dense solve is used)."""


MEMBERS: List[str] = ["settings", "num_tasks", "task_meta_parameters", "hypergrad_infos", "trainable_parameters",
                      "inner_objective", "record_final_gradient", "proximal_diagonal", "solve_exactly"]


def missing_members(lower) -> List[str]:
    """The members of the contract that ``lower`` (a built Lower problem) lacks."""
    return [name for name in MEMBERS if not hasattr(lower, name)]
