"""``--algo pretrain``: the conventional baseline, built (``engines.build``) and run by the
meta-learners' engine.

Pretraining replaces meta-training (one supervised mini-batch step per "meta-step"); all the
rest is ``MetaEngine``'s, unchanged: meta-validation and meta-test on the same fixed tasks
through the same inner loop (``FineTune``'s adaptation), the logs, checkpoints, ``--resume``,
``--eval-only``, the divergence guard, the learning-rate schedule and the inner-loop grid.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Union

import torch

from envs.pooled import PretrainEnv
from engines import distributed
from engines.extensions import Parts, choose_parts
from engines.meta_engine import MetaEngine
from imaml.config import RunConfig
from imaml.errors import UsageError
from imaml.plugins import qualname
from problems.pretrain import FineTune, Pretrained

__all__ = ["PretrainEngine", "choose_pretrain_parts"]


class PretrainEngine(MetaEngine):
    """``MetaEngine`` whose training step is a supervised step of θ on the pooled training
    classes. Under ``torchrun`` every process draws the same mini-batch (the same stream)
    and computes the loss on its share of the rows; the gradients are averaged over all rows."""

    def train_step(self) -> None:
        x, y = self.env.labelled_batch()
        mine = distributed.shard(len(y))
        self.guard.start_meta_batch(self.upper, self.global_step)
        self.upper.supervised_step(x[mine.start::mine.step], y[mine.start::mine.step])
        self.tasks_seen += self.run_config.meta_batch_size  # as many images as a meta-batch's tasks
        distributed.average_buffers(self.upper.module)
        self.meta_lr = self.upper.optimizer.param_groups[0]["lr"]
        if self.upper.lr_schedule is not None:
            self.upper.lr_schedule.step()

    def _train_record(self) -> Dict[str, float]:
        stats = self.records.drain(self.upper)[0]  # (query-stats slot) here: (loss, accuracy) per step
        record = {"train/loss": stats[:, 0].mean().item(), "train/accuracy": stats[:, 1].mean().item(),
                  "train/meta_lr": self.meta_lr}
        if self.upper.meta_grad_norm is not None:
            record["train/grad_norm"] = float(self.upper.meta_grad_norm)
        return record


def choose_pretrain_parts(config: RunConfig, lower_cls: Optional[type] = None, upper_cls: Optional[type] = None,
                          env_cls: Optional[type] = None, model: Union[torch.nn.Module, type, None] = None,
                          solver: Optional[Callable] = None) -> Parts:
    """The baseline's parts, with extensions as ``build_engine`` takes them: the Lower problem a
    subclass of ``FineTune``, the Env of ``PretrainEnv``, the Upper of ``Pretrained``."""
    if solver is not None:
        raise UsageError("solver=: --algo pretrain has no implicit meta-gradient to solve for")
    parts = choose_parts(config, lower_cls or (None if config.lower_problem else FineTune), upper_cls,
                         env_cls or (None if config.env else PretrainEnv), model)
    for got, base, flag in ((parts.lower, FineTune, "--lower-problem"), (parts.upper, Pretrained, "--upper-problem"),
                            (parts.env, PretrainEnv, "--env")):
        if not issubclass(got, base):
            raise UsageError(f"{flag} {qualname(got)}: --algo pretrain needs a subclass of {qualname(base)}")
    return parts
