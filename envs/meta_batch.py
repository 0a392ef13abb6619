"""A meta-batch of few-shot tasks, task dimension first so it can be processed in one pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MetaBatch", "Task"]


@dataclass(frozen=True)
class Task:
    """One task: a support set to adapt on and a query set to score the adapted model."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor


@dataclass(frozen=True)
class MetaBatch:
    """T tasks stacked: ``support_x`` is [T, N·K, *input], ``support_y`` is [T, N·K], and the
    same for the query set with N·Q examples. Labels are 0..N-1 within each task
    (classification) or targets (regression)."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    def task(self, index: int) -> Task:
        return Task(self.support_x[index], self.support_y[index],
                    self.query_x[index], self.query_y[index])

    def to(self, device, dtype: torch.dtype = torch.float32) -> "MetaBatch":
        """On ``device``, floating-point tensors (inputs, regression targets) as ``dtype``."""
        return MetaBatch(*(t.to(device, dtype if t.is_floating_point() else None, non_blocking=True)
                          for t in (self.support_x, self.support_y, self.query_x, self.query_y)))
