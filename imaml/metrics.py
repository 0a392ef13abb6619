"""Task losses, scores and the confidence interval every evaluation reports.

``task_loss``/``task_score`` score one task (outputs [B, ...]); ``stacked_losses``/
``stacked_scores`` each task of a task-stacked batch (outputs [T, B, ...]). The Lower problem
picks the one its tensors need, and everything downstream sees its ``task_losses``/
``task_scores``: [T] (``problems.adaptation``)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["task_loss", "task_score", "stacked_losses", "stacked_scores", "metric_name", "mean_ci95", "global_norm"]


def task_loss(kind: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for classification, mean squared error for regression."""
    if kind == "classification":
        return F.cross_entropy(output, target)
    return F.mse_loss(output, target)


def task_score(kind: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Accuracy (a fraction) for classification, MSE for regression; a 0-dim tensor."""
    if kind == "classification":
        return (output.argmax(-1) == target).float().mean()
    return F.mse_loss(output, target)


def stacked_losses(kind: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``task_loss`` of each task of a task-stacked batch (output [T, B, ...]): shape [T]."""
    if kind == "classification":
        per_example = F.cross_entropy(output.flatten(0, 1), target.flatten(0, 1), reduction="none")
        return per_example.view(target.shape[:2]).mean(1)
    return (output - target).pow(2).flatten(1).mean(1)


def stacked_scores(kind: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``task_score`` of each task of a task-stacked batch (output [T, B, ...]): shape [T]."""
    if kind == "classification":
        return (output.argmax(-1) == target).float().mean(1)
    return (output - target).pow(2).flatten(1).mean(1)


def metric_name(kind: str) -> str:
    return "accuracy" if kind == "classification" else "mse"


def global_norm(tensors) -> torch.Tensor:
    """‖(t₁, t₂, …)‖₂ of a list of tensors (``None`` entries skipped), as a 0-dim tensor with
    no graph and no host sync; ``float()`` it where a number is needed."""
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return torch.zeros(())
    with torch.no_grad():  # one multi-tensor kernel, not one norm per parameter
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


# Student's t, two-sided 95%, by degrees of freedom (beyond the table: the normal's 1.96)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042}


def mean_ci95(values: Sequence[float], student: bool = False) -> tuple:
    """Mean and half-width of its 95% interval, z·std/√N (std with N−1; nan for one value): z =
    1.96 over many values (test tasks), or with ``student`` Student's t with N−1 degrees of
    freedom, for a few (seeds; between the table's rows, the larger t)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    z = _T95[max(k for k in _T95 if k <= n - 1)] if student and n - 1 <= 30 else 1.96
    return mean, z * math.sqrt(var / n)
