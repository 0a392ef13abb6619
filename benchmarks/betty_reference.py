"""A reference meta-learner written the way Betty's own examples write one, to time against.

Modelled on betty's ``examples/maml/imaml_omniglot.py`` and ``maml_omniglot.py`` (leopard-ai/
betty), re-implemented here rather than copied:

- an outer problem holding θ and an inner problem adapting a copy of the network, wired
  as ``u2l``/``l2u`` dependencies and run by Betty's ``Engine``;
- iMAML: both are ``ImplicitProblem``s; the inner one starts every task with
  ``module.load_state_dict(outer.module.state_dict())``, adds λ/2·‖φ − θ‖² to its loss, and
  its hypergradient is betty-ml 0.1.1's own ``cg`` (``cg_alpha = 1``);
- MAML: the inner problem is an ``IterativeProblem`` (a functional module and Betty's
  differentiable SGD) starting every task from clones of θ; the outer config has
  ``first_order=False``, so the meta-gradient flows through the unrolled steps (θ stays in an
  ``ImplicitProblem`` with a plain Adam step, as in the iMAML example; the MAML example's
  outer ``IterativeProblem`` would run that Adam step through Betty's differentiable Adam);
- data reaches the problems as in the examples: the outer problem's loader yields the next
  task, kept in ``child_batch``/``parent_batch`` for the next round. (The examples switch to it
  inside the outer ``training_step``, before the outer backward pass, in which Betty's CG
  evaluates the inner loss again: their hypergradient uses the *next* task's support set.
  Here the switch waits for the next inner loop.)

One difference from the examples, as the benchmark specifies: the examples build one inner
problem per task of the meta-batch (T copies of the network, all adapted round-robin, every
MAML graph alive at once); this runs one inner problem per task in turn and accumulates the
meta-gradient over the meta-batch (``gradient_accumulation = T``), which is the same math with
T-fold less memory, and what this project's engine does.

Same math as the engine with ``--no-cg-trust-region`` and a CG that does not stop early,
except for one thing: betty-ml 0.1.1's CG updates its search direction with the old residual
(see docs/meta-gradients.md), so its iMAML meta-gradient differs; it does the same work
(``cg_iterations`` Hessian-vector products), which is what a timing comparison needs.
Every inner-problem optimizer is SGD with the run's inner learning rate; the outer one Adam.
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from betty.configs import Config, EngineConfig
from betty.engine import Engine
from betty.logging.logger_base import get_logger
from betty.problems import ImplicitProblem, IterativeProblem

__all__ = ["BettyReference"]

def _task_stream(source, meta_batch_size: int, seed: int, device, dtype) -> Iterator[tuple]:
    """One task at a time from meta-batches drawn like the engine draws them."""
    rng = np.random.default_rng([seed, 0])
    while True:
        batch = source.sample(rng, meta_batch_size).to(device, dtype)
        for i in range(batch.num_tasks):
            yield batch.support_x[i], batch.support_y[i], batch.query_x[i], batch.query_y[i]


class _Outer(ImplicitProblem):
    """θ; its loss is the query loss of the adapted inner network on the current task."""

    def training_step(self, batch):
        x_qry, y_qry = self.parent_batch
        self.upcoming = batch  # the next task, for the next round
        return F.cross_entropy(self.inner(x_qry), y_qry)

    def prime(self):
        self.upcoming = next(self.train_data_iterator[0])
        self.advance()

    def advance(self):
        """Make the upcoming task current (called when an inner loop starts)."""
        if self.upcoming is not None:
            x_spt, y_spt, x_qry, y_qry = self.upcoming
            self.child_batch, self.parent_batch, self.upcoming = (x_spt, y_spt), (x_qry, y_qry), None


class _ImplicitInner(ImplicitProblem):
    def training_step(self, batch):
        x, y = self.outer.child_batch
        return F.cross_entropy(self.module(x), y) + self.reg_loss()

    def reg_loss(self):
        pairs = zip(self.trainable_parameters(), self.outer.trainable_parameters())
        return 0.5 * self.lam * sum((p1 - p2).pow(2).sum() for p1, p2 in pairs)

    def on_inner_loop_start(self):
        self.outer.advance()
        self.module.load_state_dict(self.outer.module.state_dict())


class _IterativeInner(IterativeProblem):
    def forward(self, x):
        return self.fmodule(self.params, self.buffers, x)

    def training_step(self, batch):
        x, y = self.outer.child_batch
        return F.cross_entropy(self(x), y)

    def on_inner_loop_start(self):
        self.outer.advance()
        self.params = tuple(p.clone() for p in self.outer.trainable_parameters())
        self.buffers = tuple(b.clone() for b in self.outer.module.buffers())
        # Betty's differentiable SGD keeps the last gradient as its momentum buffer, which
        # would tie this task's graph to the previous one's (docs: STACK_NOTES)
        for state in self.optimizer.state:
            state.clear()


class BettyReference:
    """iMAML (``algo="imaml"``) or MAML (``"maml"``) on ``source``; ``meta_step()`` runs one
    meta-batch: T tasks × K inner steps through Betty's engine, one meta-update."""

    def __init__(self, algo: str, model: torch.nn.Module, source, meta_batch_size: int, inner_steps: int,
                 inner_lr: float, meta_lr: float, lam: float, cg_steps: int, seed: int, device,
                 dtype: torch.dtype = torch.float32):
        import copy

        get_logger().setLevel(logging.WARNING)
        self.steps_per_meta_batch = meta_batch_size * inner_steps
        outer_config = Config(first_order=algo == "imaml", retain_graph=algo == "imaml",
                              gradient_accumulation=meta_batch_size)
        outer = _Outer("outer", outer_config, module=model,
                       optimizer=torch.optim.Adam(model.parameters(), lr=meta_lr),
                       train_data_loader=_task_stream(source, meta_batch_size, seed, device, dtype), device=device)
        inner_module = copy.deepcopy(model)
        inner_optimizer = torch.optim.SGD(inner_module.parameters(), lr=inner_lr)
        if algo == "imaml":
            inner_config = Config(type="cg", unroll_steps=inner_steps, cg_iterations=cg_steps)
            inner = _ImplicitInner("inner", inner_config, module=inner_module, optimizer=inner_optimizer,
                                   train_data_loader=([()],), device=device)
            inner.lam = lam
        else:
            inner_config = Config(unroll_steps=inner_steps, retain_graph=True)
            inner = _IterativeInner("inner", inner_config, module=inner_module, optimizer=inner_optimizer,
                                    train_data_loader=([()],), device=device)
        dependencies = {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}}
        self.engine = Engine(problems=[outer, inner], config=EngineConfig(train_iters=1), dependencies=dependencies)
        self.outer, self.inner = outer, inner
        outer.prime()

    def meta_step(self) -> None:
        """What ``Engine.run`` does for one meta-batch's worth of iterations."""
        for _ in range(self.steps_per_meta_batch):
            self.engine.global_step += 1
            self.engine.train_step()
