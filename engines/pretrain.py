"""``--algo pretrain``: the conventional baseline, built and run by the meta-learners' engine.

Pretraining replaces meta-training (one supervised mini-batch step per "meta-step"); all the
rest is ``MetaEngine``'s, unchanged: meta-validation and meta-test on the same fixed tasks
through the same inner loop (``FineTune``'s adaptation), the logs, checkpoints, ``--resume``,
``--eval-only``, the divergence guard, the learning-rate schedule and the inner-loop grid.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import torch

from envs import build_task_sources
from envs.pooled import PretrainEnv
from engines import distributed
from engines.extensions import choose_parts, make_model
from engines.divergence import PretrainDivergenceGuard
from engines.meta_engine import MetaEngine
from engines.records import TaskRecords
from engines.run_control import RunControl
from imaml.config import RunConfig
from imaml.errors import UsageError
from imaml.plugins import qualname
from imaml.reporting import RunLog
from problems.lower import LowerConfig
from problems.pretrain import FineTune, Pretrained

__all__ = ["PretrainEngine", "build_pretrain_engine"]


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


def build_pretrain_engine(config: RunConfig, log: Optional[RunLog] = None, dtype: torch.dtype = torch.float32,
                          checkpoint_dir: Optional[Path] = None, *, lower_cls: Optional[type] = None,
                          upper_cls: Optional[type] = None, env_cls: Optional[type] = None,
                          model: Union[torch.nn.Module, type, None] = None,
                          solver: Optional[Callable] = None, sources: Optional[dict] = None) -> PretrainEngine:
    """Env + θ (a classifier over all training classes) + the fine-tuning Lower problem +
    engine, with extensions as ``build_engine`` takes them (the Lower problem a subclass of
    ``FineTune``, the Env of ``PretrainEnv``, the Upper of ``Pretrained``)."""
    from engines.build import build_lr_schedule, build_meta_optimizer, build_upper_config, resolve_device, say_to

    if solver is not None:
        raise UsageError("solver=: --algo pretrain has no implicit meta-gradient to solve for")
    parts = choose_parts(config, lower_cls or (None if config.lower_problem else FineTune), upper_cls,
                         env_cls or (None if config.env else PretrainEnv), model)
    for got, base, flag in ((parts.lower, FineTune, "--lower-problem"), (parts.upper, Pretrained, "--upper-problem"),
                            (parts.env, PretrainEnv, "--env")):
        if not issubclass(got, base):
            raise UsageError(f"{flag} {qualname(got)}: --algo pretrain needs a subclass of {qualname(base)}")
    device = resolve_device(config.device)
    if sources is None:
        with distributed.node_main_first():
            sources = build_task_sources(config)
    torch.manual_seed(config.seed)
    env = parts.env(sources, config.meta_batch_size, config.seed, device, dtype)
    model = make_model(config, parts, env.pooled.input_shape, env.pooled.num_classes).to(device, dtype)
    rows = len(distributed.shard(env.batch_size))
    upper_config = build_upper_config(config, log, first_order=False, tasks_per_update=1, share=rows / env.batch_size,
                                      guard_class=PretrainDivergenceGuard)
    upper = parts.upper("upper", upper_config, module=model,
                        optimizer=build_meta_optimizer(config, model.parameters()), device=device)
    upper.lr_schedule = build_lr_schedule(config, upper.optimizer)
    module = copy.deepcopy(model)
    inner = torch.optim.SGD(module.parameters(), lr=config.inner_lr, momentum=config.inner_momentum,
                            weight_decay=config.inner_weight_decay)
    lower = parts.lower("lower", LowerConfig(unroll_steps=config.test_inner_steps, first_order=True),
                        module=module, optimizer=inner, device=device)
    return PretrainEngine(upper, lower, env, config, log=log, control=RunControl(checkpoint_dir),
                          records=TaskRecords(config, say_to(log)))
