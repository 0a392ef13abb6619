"""Meta-test levers that change how a task is scored, not how θ is learned.

- ``--test-augment K``: K jittered copies of each support image join the support set (so a
  one-shot task adapts on 1 + K views per class), and each query's class log-probabilities are
  averaged over itself and K jittered copies. The jitter is the training one (``--jitter``,
  ``--stroke-jitter``) and is drawn from a generator fixed by the seed, the split and the task's
  index, so every method and every run scores the same views.
- ``--query-assignment balanced``: transductive inference over a task's queries. Where every
  class has the same number of queries (Lake's runs: one test item per class), the predictions
  are the class assignment with that many queries per class that maximizes the total
  log-probability (the Hungarian algorithm), instead of each query's own argmax. It uses
  knowledge of how the queries were drawn, which people and most published models do not.

Both apply at meta-validation and meta-test alike, so they are tuned where they are used.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from envs.meta_batch import MetaBatch
from envs.tasks import random_affine
from imaml.errors import UsageError

__all__ = ["MetaTestLevers", "balanced_assignment", "assign_balanced"]


def balanced_assignment(log_probs: torch.Tensor) -> torch.Tensor:
    """One task's queries [Q, N] → one-hot scores [Q, N] of the assignment that gives every class
    Q/N queries and maximizes the summed log-probability."""
    from scipy.optimize import linear_sum_assignment

    queries, ways = log_probs.shape
    if queries % ways:
        raise UsageError(f"--query-assignment balanced: a task has {queries} queries for {ways} classes, not the "
                         f"same number per class; use --query-assignment independent")
    slots = log_probs.detach().double().cpu().repeat_interleave(queries // ways, dim=1)  # one column per slot
    rows, cols = linear_sum_assignment(slots.numpy(), maximize=True)
    chosen = torch.as_tensor(cols // (queries // ways), device=log_probs.device)
    scores = torch.zeros_like(log_probs)
    scores[torch.as_tensor(rows, device=log_probs.device), chosen] = 1.0
    return scores


def assign_balanced(log_probs: torch.Tensor) -> torch.Tensor:
    """``balanced_assignment`` of one task's queries [Q, N] or of each task's [T, Q, N]."""
    rows = log_probs if log_probs.dim() == 3 else log_probs.unsqueeze(0)
    assigned = torch.stack([balanced_assignment(row) for row in rows])
    return assigned if log_probs.dim() == 3 else assigned[0]


class MetaTestLevers:
    """The run's meta-test levers (``RunConfig.validate`` checks the values; the jitter is
    Omniglot's, for images in [0, 1] with high ink: ``jitter``, by default the small affine one);
    ``active`` is False when neither is set."""

    def __init__(self, views: int, assignment: str, kind: str, seed: int, jitter: Optional[Callable] = None):
        if assignment != "independent" and kind != "classification":
            raise UsageError(f"--query-assignment {assignment}: needs a classification task; use independent")
        self.views, self.assignment, self.seed = views, assignment, seed
        self.jitter: Optional[Callable] = (jitter or random_affine()) if views else None
        self.active = bool(views) or assignment != "independent"

    def _rng(self, split: str, task: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, {"val": 1, "test": 2}.get(split, 0), task])

    def _jittered(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        return self.jitter(x.flatten(0, -4), rng).view_as(x)

    def support(self, batch: MetaBatch, split: str, start: int) -> MetaBatch:
        """The batch with K jittered copies of each support image appended to its support set."""
        if not self.views:
            return batch
        xs, ys = [], []
        for t in range(batch.num_tasks):
            rng = self._rng(split, start + t)
            x = batch.support_x[t]
            xs.append(torch.cat([x] + [self._jittered(x, rng) for _ in range(self.views)]))
            ys.append(batch.support_y[t].repeat(self.views + 1))
        return MetaBatch(torch.stack(xs), torch.stack(ys), batch.query_x, batch.query_y)

    def predict(self, predict: Callable[[torch.Tensor], torch.Tensor], query_x: torch.Tensor, split: str,
                tasks: range) -> torch.Tensor:
        """Scores for the queries of ``tasks`` (query_x is [Q, ...] for one task or [T, Q, ...]):
        log-probabilities averaged over the views, then the balanced assignment if asked."""
        output = predict(query_x)
        if not self.active:
            return output
        stacked = output.dim() == 3
        log_probs = output.log_softmax(-1)
        if self.views:
            views = query_x if stacked else query_x.unsqueeze(0)
            rngs = [self._rng(split, 10 ** 6 + t) for t in tasks]  # the queries' own stream
            for _ in range(self.views):
                jittered = torch.stack([self._jittered(views[i], rng) for i, rng in enumerate(rngs)])
                log_probs = log_probs + predict(jittered if stacked else jittered[0]).log_softmax(-1)
            log_probs = log_probs / (self.views + 1)
        if self.assignment == "balanced":
            return assign_balanced(log_probs)
        return log_probs
