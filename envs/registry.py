"""Task names -> per-split task sources. Add a benchmark by adding one builder here."""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict

from envs import glyphs
from envs.tasks import ClassImageTasks, SinusoidTasks, TaskSource
from imaml.config import RunConfig
from imaml.errors import UsageError

__all__ = ["TASKS", "build_task_sources"]

SPLITS = ("train", "val", "test")


def _glyphs(config: RunConfig) -> Dict[str, TaskSource]:
    images = glyphs.load_glyphs(config.data_root)
    return {
        split: ClassImageTasks(images[lo:hi], config.ways, config.shots, config.query_shots,
                               name=f"glyphs {split} split")
        for split, (lo, hi) in glyphs.SPLITS.items()
    }


def _sinusoid(config: RunConfig) -> Dict[str, TaskSource]:
    return {split: SinusoidTasks(config.shots, config.query_shots) for split in SPLITS}


TASKS: Dict[str, Callable[[RunConfig], Dict[str, TaskSource]]] = {
    "glyphs": _glyphs,
    "sinusoid": _sinusoid,
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
