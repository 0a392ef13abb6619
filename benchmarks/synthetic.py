"""Synthetic tasks with the shapes of the standard benchmarks, so timings need no download.

Speed does not depend on what the pixels show, only on their shape; random images keep the
benchmark self-contained and identical for every implementation it compares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import numpy as np
import torch

from envs.tasks import ClassImageTasks

__all__ = ["SHAPES", "Shape", "synthetic_source"]


@dataclass(frozen=True)
class Shape:
    """A benchmark's input shape and the conv-4 width used on it."""

    input_shape: tuple
    channels: int
    classes: int = 64
    samples: int = 20


SHAPES: Dict[str, Shape] = {
    # Omniglot: 1×28×28 glyphs, conv-4 with 64 filters (Finn et al., 2017)
    "omniglot": Shape((1, 28, 28), channels=64),
    # mini-ImageNet: 3×84×84 images, conv-4 with 32 filters and max-pooling
    "miniimagenet": Shape((3, 84, 84), channels=32),
}


def synthetic_source(shape: str, ways: int, shots: int, query_shots: int, seed: int = 0) -> ClassImageTasks:
    """N-way K-shot tasks over random uint8 images of ``SHAPES[shape]`` (same sampler as the
    real image benchmarks)."""
    spec = SHAPES[shape]
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(spec.classes, spec.samples, *spec.input_shape), dtype=np.uint8)
    return ClassImageTasks(torch.from_numpy(images), ways, shots, query_shots, name=f"synthetic {shape}")
