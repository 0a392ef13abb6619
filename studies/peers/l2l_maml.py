"""learn2learn 0.2.0's second-order MAML, as a peer row of ``studies.compare`` (``l2l-maml``).

    python -m studies.peers.l2l_maml --task omniglot --data-root DIR --seed 0 --output-dir runs/l2l

Takes run.py's flags and reads the MAML preset (``configs/<task>-maml.yaml``), on run.py's tasks
and network (``studies/peers/common.py``). Each task, as learn2learn's own MAML examples do it:
``learner = maml.clone()``, ``--inner-steps`` calls of ``learner.adapt(support loss)`` with
``learn2learn.algorithms.MAML(θ, lr=--inner-lr, first_order=False)``, then the query loss divided
by the meta-batch size backpropagated into θ, task by task; one meta-update per meta-batch.
Meta-validation and meta-test: the same clone and ``--test-inner-steps`` adapt steps (first
order there: nothing is differentiated, so the adapted weights are the same).
"""

from __future__ import annotations

import sys
from typing import Tuple

import torch

from studies.peers.common import Peer, PeerSetup, main
from imaml.errors import UsageError
from imaml.metrics import task_loss, task_score
from imaml.models import predict_query

__all__ = ["L2LMAML"]


class L2LMAML(Peer):
    """``learn2learn.algorithms.MAML`` over run.py's θ."""

    library = "learn2learn"
    algo = "maml"

    @classmethod
    def check(cls, config) -> None:
        if config.grad_checkpoint:
            raise UsageError("--grad-checkpoint: learn2learn's MAML keeps every inner step's graph; drop the flag")

    def __init__(self, setup: PeerSetup):
        super().__init__(setup)
        from envs.datasets import import_learn2learn

        l2l = import_learn2learn()
        self.library = f"learn2learn {l2l.__version__}"
        self.maml = l2l.algorithms.MAML(setup.model, lr=self.config.inner_lr, first_order=False)

    def adapt(self, task, steps: int, first_order: bool):
        """A clone of θ after ``steps`` adapt steps on ``task``'s support loss."""
        learner = self.maml.clone()
        for _ in range(steps):
            learner.adapt(task_loss(self.setup.kind, learner(task.support_x), task.support_y), first_order=first_order)
        return learner

    def meta_gradient(self, batch) -> Tuple[float, float]:
        kind, tasks = self.setup.kind, batch.num_tasks
        losses, scores = [], []
        for i in range(tasks):
            task = batch.task(i)
            learner = self.adapt(task, self.config.inner_steps, first_order=False)
            output = predict_query(learner, learner, task.support_x, task.query_x)
            loss = task_loss(kind, output, task.query_y)
            (loss / tasks).backward()  # the mean over the meta-batch, accumulated in θ's .grad
            losses.append(loss.item())
            scores.append(task_score(kind, output.detach(), task.query_y).item())
        return sum(losses) / tasks, sum(scores) / tasks

    def predict(self, task) -> torch.Tensor:
        learner = self.adapt(task, self.config.test_inner_steps, first_order=True)
        with torch.no_grad():
            return predict_query(learner, learner, task.support_x, task.query_x)


if __name__ == "__main__":
    sys.exit(main(L2LMAML))
