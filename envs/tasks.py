"""Task distributions: where the tasks of each split come from, and how one is sampled.

A ``TaskSource`` draws N-way K-shot tasks (support and query from the same classes,
disjoint examples, consistent labels) from one split. Sampling takes an explicit
``numpy.random.Generator`` and draws task by task, so the tasks a seed gives do not depend
on how many are drawn at once, nor on any global random state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from envs.episodes import Episodes
from imaml.errors import UsageError

__all__ = ["TaskSource", "ClassImageTasks", "SinusoidTasks"]


class TaskSource(Protocol):
    """What the Env needs from a task distribution (one per split)."""

    kind: str  # "classification" or "regression"
    input_shape: tuple
    num_outputs: int

    def sample(self, rng: np.random.Generator, num_tasks: int) -> Episodes: ...


class ClassImageTasks:
    """N-way K-shot classification tasks over a split's classes.

    Args:
        images: [classes, samples, H, W] or [classes, samples, C, H, W], uint8 (0..255)
            or float; each class's samples are candidates for support and query.
        ways, shots, query_shots: N, K and Q per task.
        name: the task and split, for error messages ("glyphs test split").
    """

    kind = "classification"

    def __init__(self, images, ways: int, shots: int, query_shots: int, name: str):
        images = torch.as_tensor(images)
        if images.dim() == 4:
            images = images.unsqueeze(2)  # grayscale: add the channel dimension
        classes, samples = images.shape[:2]
        if ways > classes:
            raise UsageError(f"--ways {ways}: the {name} has only {classes} classes; use --ways <= {classes}")
        if shots + query_shots > samples:
            raise UsageError(
                f"--shots {shots} + --query-shots {query_shots}: the {name} has only {samples} "
                f"examples per class; use shots + query-shots <= {samples}")
        self.images = images
        self.ways, self.shots, self.query_shots = ways, shots, query_shots
        self.input_shape = tuple(images.shape[2:])
        self.num_outputs = ways
        self._scale = 255.0 if images.dtype == torch.uint8 else 1.0

    def sample(self, rng: np.random.Generator, num_tasks: int) -> Episodes:
        n, k, q = self.ways, self.shots, self.query_shots
        classes, samples = self.images.shape[:2]
        picks = []
        for _ in range(num_tasks):
            chosen = rng.permutation(classes)[:n]  # label i <- chosen[i]: a random labelling
            examples = np.argsort(rng.random((n, samples)), axis=1)[:, : k + q]  # disjoint per class
            picks.append((chosen, examples))
        chosen = torch.from_numpy(np.stack([c for c, _ in picks]))[:, :, None]  # [T, N, 1]
        examples = torch.from_numpy(np.stack([e for _, e in picks]))  # [T, N, K+Q]
        x = self.images[chosen, examples].float().div_(self._scale)  # [T, N, K+Q, *input]
        labels = torch.arange(n).view(1, n, 1)
        support_y = labels.expand(num_tasks, n, k).reshape(num_tasks, n * k)
        query_y = labels.expand(num_tasks, n, q).reshape(num_tasks, n * q)
        return Episodes(
            support_x=x[:, :, :k].reshape(num_tasks, n * k, *self.input_shape),
            support_y=support_y,
            query_x=x[:, :, k:].reshape(num_tasks, n * q, *self.input_shape),
            query_y=query_y,
        )


@dataclass
class SinusoidTasks:
    """Regression tasks of the MAML paper: y = A·sin(x − φ), A ~ U[0.1, 5], φ ~ U[0, π],
    x ~ U[−5, 5]; K support points and Q query points per task. Every split draws from the
    same (continuous) distribution; they differ only in their random streams."""

    shots: int
    query_shots: int
    kind: str = "regression"
    input_shape: tuple = (1,)
    num_outputs: int = 1

    def sample(self, rng: np.random.Generator, num_tasks: int) -> Episodes:
        k, q = self.shots, self.query_shots
        rows = []
        for _ in range(num_tasks):
            amplitude, phase = rng.uniform(0.1, 5.0), rng.uniform(0.0, np.pi)
            x = rng.uniform(-5.0, 5.0, size=(k + q, 1))
            rows.append((x, amplitude * np.sin(x - phase)))
        x = torch.from_numpy(np.stack([r[0] for r in rows])).float()
        y = torch.from_numpy(np.stack([r[1] for r in rows])).float()
        return Episodes(x[:, :k], y[:, :k], x[:, k:], y[:, k:])
