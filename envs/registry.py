"""Task names -> per-split task sources. Add a benchmark by adding one builder here."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Dict

from envs import datasets, glyphs
from envs.tasks import ClassImageTasks, SinusoidTasks, TaskSource, random_crop_flip
from imaml.config import RunConfig
from imaml.errors import UsageError

__all__ = ["TASKS", "build_task_sources"]

SPLITS = ("train", "val", "test")


def query_shots(config: RunConfig, split: str) -> int:
    """Query examples per class: --test-query-shots at meta-validation and meta-test."""
    if split != "train" and config.test_query_shots is not None:
        return config.test_query_shots
    return config.query_shots


def _glyphs(config: RunConfig) -> Dict[str, TaskSource]:
    if config.augment:
        raise UsageError("--augment true: the glyphs task has no augmentation; it is for the "
                         "ImageNet- and CIFAR-derived tasks")
    images = glyphs.load_glyphs(config.data_root)
    return {
        split: ClassImageTasks(images[lo:hi], config.ways, config.shots, query_shots(config, split),
                               name=f"glyphs {split} split")
        for split, (lo, hi) in glyphs.SPLITS.items()
    }


def _sinusoid(config: RunConfig) -> Dict[str, TaskSource]:
    return {split: SinusoidTasks(config.shots, query_shots(config, split)) for split in SPLITS}


def _benchmark(name: str) -> Callable[[RunConfig], Dict[str, TaskSource]]:
    """A real benchmark read from --data-root (see envs.datasets for the files)."""
    spec = datasets.DATASETS[name]

    def build(config: RunConfig) -> Dict[str, TaskSource]:
        if config.augment and spec.augment_padding is None:
            raise UsageError(f"--augment true: {name} has no crop/flip augmentation (its own is "
                             f"built in); use it with mini-imagenet, tiered-imagenet, cifarfs or fc100")
        root = Path(config.data_root)
        if config.download:
            datasets.download(spec, root)
        sources = {}
        for split in SPLITS:
            augment = random_crop_flip(spec.augment_padding) if config.augment and split == "train" else None
            sources[split] = ClassImageTasks(
                datasets.load_split(spec, root, split), config.ways, config.shots, query_shots(config, split),
                name=f"{name} {split} split", mean=spec.mean, std=spec.std, augment=augment,
                class_rotations=spec.class_rotations)
        return sources

    return build


TASKS: Dict[str, Callable[[RunConfig], Dict[str, TaskSource]]] = {
    "glyphs": _glyphs,
    "sinusoid": _sinusoid,
    **{name: _benchmark(name) for name in datasets.DATASETS},
}


def build_task_sources(config: RunConfig) -> Dict[str, TaskSource]:
    """The train / val / test task sources of ``config.task``, or a one-line UsageError."""
    if config.task not in TASKS:
        raise UsageError(f"--task {config.task}: unknown task; choose one of {', '.join(TASKS)}")
    if config.ways is None and config.task != "sinusoid":
        raise UsageError(f"--ways none: the {config.task} task is classification and needs --ways N")
    sources = TASKS[config.task](config)
    if config.test_ways is not None and config.test_ways != config.ways:
        # meta-validation and meta-test at another number of ways: the same builder, asked again
        evaluation = TASKS[config.task](dataclasses.replace(config, ways=config.test_ways))
        sources = {**sources, "val": evaluation["val"], "test": evaluation["test"]}
    return sources
