"""Task distributions: where the tasks of each split come from, and how one is sampled.

A ``TaskSource`` draws N-way K-shot tasks (support and query from the same classes,
disjoint examples, consistent labels) from one split. Sampling takes an explicit
``numpy.random.Generator`` and draws task by task, so the tasks a seed gives do not depend
on how many are drawn at once, nor on any global random state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch

from envs.meta_batch import MetaBatch
from imaml.errors import UsageError

__all__ = ["TaskSource", "ClassPool", "ArrayPool", "RotatedClasses", "ClassImageTasks", "SinusoidTasks",
           "random_crop_flip", "random_affine"]


class TaskSource(Protocol):
    """What the Env needs from a task distribution (one per split)."""

    kind: str  # "classification" or "regression"
    input_shape: tuple
    num_outputs: int

    def sample(self, rng: np.random.Generator, num_tasks: int) -> MetaBatch: ...


class ClassPool(Protocol):
    """The examples of one split, grouped by class: all that task sampling needs.

    Classes may hold different numbers of examples (tiered-ImageNet does), and a pool may
    decode its images lazily (tiered-ImageNet's 450k PNGs do not fit in memory decoded)."""

    sizes: np.ndarray  # examples per class
    input_shape: tuple  # (C, H, W)

    def images(self, cls: int, picks: np.ndarray) -> torch.Tensor:
        """Examples ``picks`` (positions within class ``cls``) as [len(picks), C, H, W],
        uint8 (0..255) or float."""
        ...


class ArrayPool:
    """A pool held as one dense array [classes, samples, H, W] or [classes, samples, C, H, W]."""

    def __init__(self, array):
        array = torch.as_tensor(array)
        if array.dim() == 4:
            array = array.unsqueeze(2)  # grayscale: add the channel dimension
        self.array = array
        self.sizes = np.full(array.shape[0], array.shape[1])
        self.input_shape = tuple(array.shape[2:])

    def images(self, cls: int, picks: np.ndarray) -> torch.Tensor:
        return self.array[cls, torch.from_numpy(picks)]


class RotatedClasses:
    """Every class of ``pool`` four times, rotated by 0°, 90°, 180° and 270°: each rotation is a
    class of its own (Omniglot's usual augmentation). Class ``4c + k`` is class ``c`` turned k times."""

    def __init__(self, pool):
        self.pool = pool if hasattr(pool, "images") else ArrayPool(pool)
        self.sizes = np.repeat(self.pool.sizes, 4)
        self.input_shape = self.pool.input_shape

    def images(self, cls: int, picks: np.ndarray) -> torch.Tensor:
        return self.pool.images(cls // 4, picks).rot90(cls % 4, dims=(-2, -1))

    @staticmethod
    def groups(groups: Sequence[np.ndarray]) -> list:
        """The same groups of classes (alphabets) in the rotated pool's numbering."""
        return [(4 * np.asarray(g)[:, None] + np.arange(4)).ravel() for g in groups]


class ClassImageTasks:
    """N-way K-shot classification tasks over a split's classes.

    Args:
        pool: the split's examples by class (a ``ClassPool``, or a dense array that
            ``ArrayPool`` accepts).
        ways, shots, query_shots: N, K and Q per task.
        name: the task and split, for error messages ("glyphs test split").
        mean, std: per-channel input normalization, applied after scaling to [0, 1].
        augment: ``augment(x, rng)`` on each task's float images [n, C, H, W] (training only).
        class_rotations: rotate all images of each class of a task by a random multiple of
            90° (Omniglot's augmentation in the MAML code: a rotated character is a new class).
        groups: classes grouped (Omniglot's alphabets): every task draws its N classes from
            one group, chosen uniformly among those with at least N classes.
        description: what this split is, for results.json.
    """

    kind = "classification"

    def __init__(self, pool, ways: int, shots: int, query_shots: int, name: str,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 augment: Optional[Callable] = None, class_rotations: bool = False,
                 groups: Optional[Sequence[np.ndarray]] = None, description: Optional[dict] = None):
        if not hasattr(pool, "images"):
            pool = ArrayPool(pool)
        classes, smallest = len(pool.sizes), int(np.min(pool.sizes))
        if ways > classes:
            raise UsageError(f"--ways {ways}: the {name} has only {classes} classes; use --ways <= {classes}")
        if shots + query_shots > smallest:
            raise UsageError(
                f"--shots {shots} + --query-shots {query_shots}: the {name} has only {smallest} "
                f"examples per class{' in its smallest class' if np.ptp(pool.sizes) else ''}; "
                f"use shots + query-shots <= {smallest}")
        self.pool = pool
        self.ways, self.shots, self.query_shots = ways, shots, query_shots
        self.input_shape = tuple(pool.input_shape)
        self.num_outputs = ways
        channels = self.input_shape[0]
        self._mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(channels, 1, 1)
        self._std = None if std is None else torch.tensor(std, dtype=torch.float32).view(channels, 1, 1)
        self.augment = augment
        self.class_rotations = class_rotations
        self.groups = None
        if groups is not None:
            self.groups = [np.asarray(g) for g in groups if len(g) >= ways]
            if not self.groups:
                largest = max(len(g) for g in groups)
                raise UsageError(f"--episodes within-alphabet: no alphabet of the {name} has {ways} classes "
                                 f"(the largest has {largest}); use --ways <= {largest} or --episodes any")
        self.description = description

    def sample(self, rng: np.random.Generator, num_tasks: int) -> MetaBatch:
        n, k, q = self.ways, self.shots, self.query_shots
        tasks = [self._task(rng) for _ in range(num_tasks)]
        x = torch.stack(tasks)  # [T, N, K+Q, *input]
        labels = torch.arange(n).view(1, n, 1)
        support_y = labels.expand(num_tasks, n, k).reshape(num_tasks, n * k)
        query_y = labels.expand(num_tasks, n, q).reshape(num_tasks, n * q)
        return MetaBatch(
            support_x=x[:, :, :k].reshape(num_tasks, n * k, *self.input_shape),
            support_y=support_y,
            query_x=x[:, :, k:].reshape(num_tasks, n * q, *self.input_shape),
            query_y=query_y,
        )

    def _task(self, rng: np.random.Generator) -> torch.Tensor:
        """One task's images [N, K+Q, *input]: N random classes (label i <- the i-th drawn, a
        random labelling), K+Q distinct examples of each."""
        n, m = self.ways, self.shots + self.query_shots
        if self.groups is None:
            chosen = rng.permutation(len(self.pool.sizes))[:n]
        else:
            group = self.groups[int(rng.integers(len(self.groups)))]
            chosen = group[rng.permutation(len(group))[:n]]
        picks = [np.argsort(rng.random(self.pool.sizes[c]))[:m] for c in chosen]
        x = torch.stack([self.pool.images(int(c), p) for c, p in zip(chosen, picks)])
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if self.class_rotations:
            turns = rng.integers(0, 4, size=n)
            x = torch.stack([c.rot90(int(t), dims=(-2, -1)) for c, t in zip(x, turns)])
        if self.augment is not None:
            x = self.augment(x.flatten(0, 1), rng).view_as(x)
        return self.normalize(x)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] with this split's per-channel normalization (if any)."""
        return x if self._mean is None else (x - self._mean) / self._std


def random_crop_flip(padding: int) -> Callable:
    """The usual few-shot image augmentation: a random crop of the zero-padded image and a
    horizontal flip with probability 1/2, drawn per image from the task's generator."""

    def augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        size = x.shape[-1]
        padded = torch.nn.functional.pad(x, (padding,) * 4)
        offsets = rng.integers(0, 2 * padding + 1, size=(x.shape[0], 2))
        flips = rng.random(x.shape[0]) < 0.5
        out = torch.stack([padded[i, :, r:r + size, c:c + size] for i, (r, c) in enumerate(offsets)])
        out[torch.from_numpy(flips)] = out[torch.from_numpy(flips)].flip(-1)
        return out

    return augment


def random_affine(degrees: float = 10.0, shift: float = 0.1, scale: Tuple[float, float] = (0.9, 1.1),
                  shear: float = 0.0, thickness: float = 0.0) -> Callable:
    """Affine jitter of each image (Omniglot): a rotation within ±``degrees``, a shift within
    ±``shift`` of the image size and a scale in ``scale``, drawn per image from the task's
    generator; the border is filled with the background (0, ink is high). With ``shear``, each
    axis has its own scale and a shear within ±``shear`` (Koch et al.'s ranges); with
    ``thickness``, the strokes are then thickened or thinned by a fraction up to it of one 3×3
    dilation or erosion. The extra draws come after the others, so the small jitter's stream
    is the same with or without them."""

    def augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        n = x.shape[0]
        angle = torch.from_numpy(rng.uniform(-degrees, degrees, n) * np.pi / 180).float()
        zoom = torch.from_numpy(rng.uniform(*scale, n)).float()
        offset = torch.from_numpy(rng.uniform(-2 * shift, 2 * shift, (n, 2))).float()  # [-1, 1] coordinates
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        linear = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # output → input
        if shear:
            aspect = zoom / torch.from_numpy(rng.uniform(*scale, n)).float()  # the second axis's own scale
            rho = torch.from_numpy(rng.uniform(-shear, shear, (n, 2))).float()
            ones = torch.ones(n)
            warp = torch.stack([torch.stack([ones, rho[:, 0]], 1), torch.stack([rho[:, 1], aspect], 1)], 1)
            linear = linear @ warp
        theta = torch.cat([linear, offset[:, :, None]], 2)
        grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
        out = torch.nn.functional.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
        if thickness:
            amount = torch.from_numpy(rng.uniform(-thickness, thickness, n)).float().view(n, 1, 1, 1)
            dilated = torch.nn.functional.max_pool2d(out, 3, 1, 1)
            eroded = -torch.nn.functional.max_pool2d(-out, 3, 1, 1)
            out = out + amount.clamp(min=0) * (dilated - out) + (-amount).clamp(min=0) * (eroded - out)
        return out

    return augment


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

    def sample(self, rng: np.random.Generator, num_tasks: int) -> MetaBatch:
        k, q = self.shots, self.query_shots
        rows = []
        for _ in range(num_tasks):
            amplitude, phase = rng.uniform(0.1, 5.0), rng.uniform(0.0, np.pi)
            x = rng.uniform(-5.0, 5.0, size=(k + q, 1))
            rows.append((x, amplitude * np.sin(x - phase)))
        x = torch.from_numpy(np.stack([r[0] for r in rows])).float()
        y = torch.from_numpy(np.stack([r[1] for r in rows])).float()
        return MetaBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])
