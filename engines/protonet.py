"""``--algo protonet``: Prototypical Networks (``problems.protonet``), built (``engines.build``)
and run by the meta-learners' engine.

A meta-step is one prototype-loss step of θ on this process's tasks of the meta-batch; all the
rest is ``MetaEngine``'s: the same episodes, meta-validation and meta-test on the same fixed
tasks (with no inner step: the support set's prototypes are the classifier), logs, checkpoints,
``--resume``, ``--eval-only``, ``--time-budget``, the divergence guard and the schedule.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Union

import torch

from engines import distributed
from engines.extensions import Parts, choose_parts
from engines.meta_engine import MetaEngine
from imaml.config import RunConfig
from imaml.errors import UsageError
from imaml.plugins import qualname
from problems.protonet import PrototypeClassifier, Prototypical

__all__ = ["ProtoNetEngine", "choose_protonet_parts"]


class ProtoNetEngine(MetaEngine):
    """``MetaEngine`` whose training step is ProtoNet's and whose adaptation takes no step.

    ``fine_tune_steps`` > 0 makes meta-validation and meta-test fine-tune the whole network
    instead, from the prototype head, with ``FineTune``'s SGD steps (``--inner-lr``) on the
    support set and its views: a lever ``studies.lake_levers --fine-tune`` measures on a
    trained θ, not a flag (meta-validation did not choose it; docs/benchmarks.md)."""

    fine_tune_steps = 0

    def train_step(self) -> None:
        batch = self.env.step()
        self.guard.start_meta_batch(self.upper, self.global_step)
        self.upper.prototype_step(batch, distributed.shard(batch.num_tasks))
        self.tasks_seen += batch.num_tasks
        distributed.average_buffers(self.upper.module)  # running statistics, from every process's tasks
        self.meta_lr = self.upper.optimizer.param_groups[0]["lr"]
        if self.upper.lr_schedule is not None:
            self.upper.lr_schedule.step()

    def inner_loop(self, steps: int, probe: bool = False) -> Optional[List[dict]]:
        """The current task's classifier: its prototypes, no step (``steps`` does not apply), or
        ``fine_tune_steps`` from them."""
        if self.fine_tune_steps:
            return super().inner_loop(self.fine_tune_steps, probe)
        self.lower.begin_task()
        self.lower.on_inner_loop_start()
        if not probe:
            return None
        support, query = self._current_losses()
        return [{"support": [s], "query": [q]} for s, q in zip(support, query)]


def choose_protonet_parts(config: RunConfig, lower_cls: Optional[type] = None, upper_cls: Optional[type] = None,
                          env_cls: Optional[type] = None, model: Union[torch.nn.Module, type, None] = None,
                          solver: Optional[Callable] = None) -> Parts:
    """ProtoNet's parts, with extensions as ``build_engine`` takes them: the Lower problem a
    subclass of ``PrototypeClassifier``, the Upper of ``Prototypical``."""
    if solver is not None:
        raise UsageError("solver=: --algo protonet has no implicit meta-gradient to solve for")
    parts = choose_parts(config, lower_cls or (None if config.lower_problem else PrototypeClassifier),
                         upper_cls or (None if config.upper_problem else Prototypical), env_cls, model)
    for got, base, flag in ((parts.lower, PrototypeClassifier, "--lower-problem"),
                            (parts.upper, Prototypical, "--upper-problem")):
        if not issubclass(got, base):
            raise UsageError(f"{flag} {qualname(got)}: --algo protonet needs a subclass of {qualname(base)}")
    return parts
