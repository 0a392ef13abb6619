"""The data side of the bilevel problem: a Betty Env serving coupled support/query sets."""

from __future__ import annotations

from typing import Dict, Iterator

import numpy as np
import torch
from betty.envs import Env

from envs.meta_batch import MetaBatch, Task
from envs.omniglot import OneShotRuns
from envs.tasks import TaskSource

__all__ = ["FewShotEnv"]

_SPLIT_STREAM = {"train": 0, "val": 1, "test": 2}


class FewShotEnv(Env):
    """Samples meta-batches of tasks and serves the current task to both levels.

    ``step()`` draws the next meta-training batch (``meta_batch_size`` tasks, task dimension
    first); ``select(i)`` makes task ``i`` current. The Lower problem reads ``support`` and
    the Upper problem reads ``query`` of the same task, which is what couples them.

    Randomness: each split has its own stream derived from ``seed``. Meta-training advances
    the train stream; ``episodes(split, n)`` restarts the val/test stream every time, so
    every meta-validation sees the same tasks and the meta-test tasks for a seed are
    identical across algorithms and runs.

    Extensions (``--env module:Class``) are built as ``Class(sources, meta_batch_size, seed,
    device, dtype)`` and may override: ``step() -> MetaBatch`` (what the next meta-batch is,
    e.g. a curriculum; it must ``load`` it), the ``support``/``query`` properties (what each
    level sees of the current task, e.g. augmentation), ``episodes(split, n)`` (keep it a
    fixed stream per split, or evaluations stop being comparable) and ``state_dict`` /
    ``load_state_dict`` (extend them with any new state, or ``--resume`` is not exact).
    Leave ``load`` and ``select`` alone: the engine drives tasks through them.
    """

    def __init__(self, sources: Dict[str, TaskSource], meta_batch_size: int, seed: int,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        self.sources = sources
        self.meta_batch_size = meta_batch_size
        self.seed = seed
        self.device = torch.device(device)
        self.dtype = dtype
        self.train_rng = self._stream("train")
        self.batch: MetaBatch | None = None
        self.current: Task | None = None

    @property
    def kind(self) -> str:
        return self.sources["train"].kind

    def _stream(self, split: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLIT_STREAM[split]])

    def step(self) -> MetaBatch:
        """Draw the next meta-training batch and make its first task current."""
        return self.load(self.sources["train"].sample(self.train_rng, self.meta_batch_size))

    def load(self, batch: MetaBatch) -> MetaBatch:
        self.batch = batch.to(self.device, self.dtype)
        self.select(0)
        return self.batch

    def select(self, index: int) -> Task:
        self.current = self.batch.task(index)
        return self.current

    def select_all(self) -> Task:
        """Make the whole meta-batch current (task dimension first), for task-vectorized problems."""
        batch = self.batch
        self.current = Task(batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        return self.current

    @property
    def support(self) -> tuple:
        return self.current.support_x, self.current.support_y

    @property
    def query(self) -> tuple:
        return self.current.query_x, self.current.query_y

    def episodes(self, split: str, num_tasks: int, batch_size: int | None = None) -> Iterator[MetaBatch]:
        """The fixed evaluation tasks of ``split``, in batches (same tasks whatever the batch size)."""
        rng = self._stream(split)
        batch_size = batch_size or self.meta_batch_size
        if isinstance(self.sources[split], OneShotRuns):  # a fixed list of tasks, served in order
            yield from self.sources[split].batches(num_tasks, batch_size)
            return
        for start in range(0, num_tasks, batch_size):
            yield self.sources[split].sample(rng, min(batch_size, num_tasks - start))

    def describe(self) -> dict:
        """What each split's tasks are, where its source says (results.json's ``splits``)."""
        return {split: source.description for split, source in self.sources.items()
                if getattr(source, "description", None)}

    # train-stream state, so a resumed run continues the same task sequence
    def state_dict(self) -> dict:
        return {"train_rng": self.train_rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.train_rng.bit_generator.state = state["train_rng"]
