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


def mean_ci95(values: Sequence[float]) -> tuple:
    """Mean and half-width of the 95% interval, 1.96·std/√N (std with N−1)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, 1.96 * math.sqrt(var / n)
