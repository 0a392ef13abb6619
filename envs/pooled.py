"""The meta-training classes pooled into one labelled set: the data of ``--algo pretrain``.

A conventional baseline trains one classifier on every meta-training class at once (Chen
et al., "A Closer Look at Few-shot Classification", ICLR 2019), then meets the same
meta-validation and meta-test tasks as the meta-learners. ``PooledClasses`` serves labelled
mini-batches from the *training* source only, so a validation or test class can never reach
training; ``PretrainEnv`` is the ``FewShotEnv`` that also serves them, from its training
stream (so ``--resume`` continues the same sequence).
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch

from envs.few_shot_env import FewShotEnv
from envs.tasks import ClassImageTasks, TaskSource
from imaml.errors import UsageError

__all__ = ["PooledClasses", "PretrainEnv"]


class PooledClasses:
    """Every class of a training ``ClassImageTasks`` as one C-way classification set.

    Examples are drawn uniformly over all examples of the split (classes in proportion to
    their size, as an epoch would), with the split's own preprocessing: scaling, the
    augmentation of training tasks (``--augment``) and normalization. Where the source turns
    each task's classes by random quarter turns (``class_rotations``, Omniglot), a class turned
    k times is class ``4c + k`` here, since the tasks treat a turned character as a new class.
    """

    def __init__(self, source: TaskSource):
        if not isinstance(source, ClassImageTasks):
            raise UsageError(f"--algo pretrain trains a classifier on the meta-training classes; this task's "
                             f"training split ({type(source).__name__}) has no classes")
        self.source = source
        self.rotations = 4 if source.class_rotations else 1
        sizes = np.asarray(source.pool.sizes)
        self.ends = np.cumsum(sizes)
        self.starts = self.ends - sizes
        self.num_classes = len(sizes) * self.rotations
        self.input_shape = source.input_shape

    def sample(self, rng: np.random.Generator, count: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``count`` examples [count, *input] and their classes [count] (0..num_classes-1)."""
        flat = rng.integers(int(self.ends[-1]), size=count)
        classes = np.searchsorted(self.ends, flat, side="right")
        picks = flat - self.starts[classes]
        turns = rng.integers(0, self.rotations, size=count)
        pool = self.source.pool
        x = torch.cat([pool.images(int(c), np.array([p])) for c, p in zip(classes, picks)])
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if self.rotations > 1:
            x = torch.stack([image.rot90(int(t), dims=(-2, -1)) for image, t in zip(x, turns)])
        if self.source.augment is not None:
            x = self.source.augment(x, rng)
        labels = torch.from_numpy(classes * self.rotations + turns).long()
        return self.source.normalize(x), labels


class PretrainEnv(FewShotEnv):
    """A ``FewShotEnv`` that also serves labelled mini-batches of the pooled training classes.

    A mini-batch holds as many images as a meta-batch does (``meta_batch_size`` ·
    ways · (shots + query-shots)), so a pretraining step and a meta-step see the same number
    of training images. Meta-validation and meta-test are the base class's, unchanged: the
    same fixed tasks for the same seed as every meta-learner's."""

    def __init__(self, sources: Dict[str, TaskSource], meta_batch_size: int, seed: int,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(sources, meta_batch_size, seed, device, dtype)
        self.pooled = PooledClasses(sources["train"])
        train = sources["train"]
        self.batch_size = meta_batch_size * train.ways * (train.shots + train.query_shots)

    def labelled_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The next training mini-batch (from the training stream), on the Env's device."""
        x, y = self.pooled.sample(self.train_rng, self.batch_size)
        return x.to(self.device, self.dtype), y.to(self.device)
