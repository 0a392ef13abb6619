"""The Lower (task adaptation) problem: adapt the meta-parameters θ to one task's support set.

Two Betty problem types, one per way of differentiating through the adaptation:

- ``ImplicitLower`` (iMAML): an ``ImplicitProblem`` whose objective is the proximally
  regularized support loss  g(φ, θ) = L_support(φ) + λ/2·‖φ − θ‖²  (Rajeswaran et al., 2019,
  eq. 3, same λ). Its meta-gradient comes from the implicit function theorem through the
  solver named in ``config.type`` (see ``imaml.solvers``), so memory does not grow with
  the number of inner steps.
- ``UnrolledLower`` (MAML): an ``IterativeProblem`` whose inner SGD updates are themselves
  differentiable, so the meta-gradient flows through every step (second order), or, with
  ``config.first_order``, treats the inner gradients as constants (first-order MAML).

Both start each task from θ (``on_inner_loop_start``), read the current task's support set
from the Env, and serve meta-training, meta-validation and meta-test alike: the engine
runs the same Betty ``step()`` loop in every phase; only train/eval mode differs.

Extensions subclass one of them (``--lower-problem module:Class``); each class docstring lists
the hooks to override and the plumbing to leave alone (docs/extending.md walks through one).
"""

from __future__ import annotations

import warnings
from typing import List, Optional

import torch
from betty.problems import ImplicitProblem, IterativeProblem
from torch.func import functional_call

from imaml import betty_glue, solvers
from imaml.inner_optimizers import INNER_OPTIMIZERS, NEEDS_HVP, InnerLoop, InnerStep, rows, task_norms
from imaml.models import scratch_buffers
from problems.adaptation import LowerConfig, TaskAdaptation, proximal
from problems.head_solve import solve_head_system
from problems.unrolled_steps import RecomputedSteps, differentiable_sgd

__all__ = ["LowerConfig", "ImplicitLower", "UnrolledLower", "differentiable_sgd"]


class ImplicitLower(TaskAdaptation, ImplicitProblem):
    """iMAML's inner problem: minimize  L_support(φ) + λ/2·‖φ − φ₀‖²  from φ₀ (θ, or a zero head)
    with ``--inner-optimizer`` (SGD, or a line-search method of ``imaml.inner_optimizers``),
    each task stopping at ``--inner-tol`` stationarity (``stationarity()`` reports it).

    φ is ``self.phi``: one task of the whole network adapts ``self.module``'s own parameters in
    place; otherwise φ is [T, ...] leaves (a stacked meta-batch through ``self.grouped``, or the
    head on θ's features, ``--adapt head``). The meta-gradient is the implicit one at the adapted
    φ, for whatever objective ``training_step`` returns: −(∂²g/∂θ∂φ)(∂²g/∂φ²)⁻¹ ∇φ L_query, plus
    the direct ∂L_query/∂θ where ``forward`` uses θ itself (the head's features).

    Hooks an extension overrides (call ``super()`` where it extends rather than replaces):

    - ``training_step(batch) -> Tensor``: the inner objective g(φ, θ); default task loss +
      ``regularizer()``. (``task_objectives(batch)``, g per task for the line searches, is it
      for one task; a stacked extension overrides both.)
    - ``regularizer() -> Tensor``: the coupling to θ; default λ/2·‖φ − φ₀‖² over
      ``trainable_parameters()``. It must be twice differentiable with a non-zero ∂²g/∂θ∂φ,
      or θ gets no meta-gradient (an L1 term has zero curvature: use it with unrolled MAML).
    - ``forward(x) -> Tensor``: the adapted model's output (support, query and meta-test).
    - ``trainable_parameters() -> list``: the part of φ the inner loop adapts and the solver
      differentiates (default: ``self.phi``).
    - ``on_inner_loop_start()``: set φ from the inner loop's ``Adaptation`` (``self.plan``).

    Leave alone: ``__init__``'s signature (the builder calls it as here), ``step``,
    ``one_step_descent``, ``backward``, ``optimizer_step``, ``begin_task``, ``get_batch``:
    Betty's plumbing and the engine's inner loop depend on them.
    """

    def __init__(self, name, config: LowerConfig, module, optimizer, device=None):
        solvers.install()  # the corrected solvers named by config.type (under our own keys)
        super().__init__(name, config, module=module, optimizer=optimizer, device=device)
        self.hypergrad_infos: list = []  # the solver's SolveInfo of each task of the last inner loop
        self.inner = InnerLoop(self.settings.inner_tol)
        self._final_norms: Optional[torch.Tensor] = None
        self.setup_adaptation()
        self.phi: list = list(self.module.parameters())  # φ (see the class docstring)
        self.task_meta_parameters = None  # θ's per-task views that g reads, where φ has a task dimension

    def trainable_parameters(self):
        return self.phi

    def parameters(self):
        return self.phi

    def forward(self, x):
        if self.on_features is not None:
            return self.on_features.forward(self.phi, x)
        return self.grouped(self.phi, x) if self.stacked else super().forward(x)

    def encoder_tensors(self, task: int, support: bool) -> dict:
        """The tensors θ's encoder runs with for ``--adapt head``: θ; in meta-training θ itself for
        the queries (their direct term needs no split by task) and per-task views for the support
        set (the solve's cross term, task by task)."""
        theta = self.meta_problem.initial_parameters()
        if self.task_meta_parameters is None or not support:
            return dict(zip(self._param_names, theta if self.in_training else (t.detach() for t in theta)))
        if self._task_rows is None:  # one unbind per inner loop: its backward stacks the T rows at once
            self._task_rows = [t.unbind(0) for t in self.task_meta_parameters]
        return {name: rows[task] for name, rows in zip(self._param_names, self._task_rows)}

    def initialize(self, engine_config):
        super().initialize(engine_config)
        self.zero_theta_head()

    def begin_task(self) -> None:
        super().begin_task()
        self.hypergrad_infos = []
        self.inner = InnerLoop(self.settings.inner_tol)
        self._final_norms = None

    def one_step_descent(self, batch=None):
        """One step of ``--inner-optimizer`` on g, for the tasks not yet within ``--inner-tol``
        (``imaml.inner_optimizers``); once all are, the loop's remaining steps are no-ops, so
        Betty's step count (and its hand-over to the Upper problem) stays. An inner step needs no
        graph to θ: the head's features go in detached."""
        batch = self.get_batch() if batch is None else batch
        betty_glue.remember_batch(self, batch)
        if self.inner.done:
            self.inner_losses.append(self.inner_losses[-1])
            return {"loss": self.inner_losses[-1] * self.num_tasks}
        if self.on_features is not None:
            self.on_features.graph = False
        try:
            return self._inner_step(batch)
        finally:
            if self.on_features is not None:
                self.on_features.graph = True

    def _inner_step(self, batch) -> dict:
        name = self.settings.inner_optimizer
        params = list(self.trainable_parameters())
        values = None  # g per task: only the line searches need it
        if name == "sgd":  # the objective as Betty computes it (one scalar for all tasks)
            loss = betty_glue.objective(self, batch)
        else:
            values = self.task_objectives(batch)
            loss = values.sum()
            values = values.detach()
        grads = torch.autograd.grad(loss, params, create_graph=name in NEEDS_HVP, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        self.inner.measure(task_norms(grads, self.num_tasks))
        total = loss.item()
        self.inner_losses.append(total / self.num_tasks)
        if not self.inner.done:
            grad_rows = None if name == "sgd" else rows(grads, self.num_tasks)
            step = InnerStep(params, values, grad_rows, lambda: self._trial_objectives(batch), self.inner,
                             lr=self.optimizer.param_groups[0]["lr"], lam=self.weakest_lam(),
                             cg_steps=self.settings.inner_cg_steps, grads=grads,
                             proximal_diagonal=self.proximal_diagonal(),
                             hvp=lambda u: rows(torch.autograd.grad(grad_rows, params, u, retain_graph=True), self.num_tasks))
            INNER_OPTIMIZERS[name](step, self.optimizer)
        return {"loss": total}

    def training_step(self, batch) -> torch.Tensor:
        """g = L_support + ``regularizer()`` (+ the inner weight decay), summed over the tasks:
        what the inner steps and the solver differentiate."""
        x, y = batch
        loss = self.support_loss(x, y) + self.regularizer()
        decay = self.settings.inner_weight_decay
        if decay:  # inner weight decay is part of the objective the solver sees
            loss = loss + proximal(self.trainable_parameters(), None, decay)
        return loss

    def task_objectives(self, batch) -> torch.Tensor:
        """g of each task of the inner loop, [T]: what the line searches compare per task. One task
        with φ shaped as θ: ``training_step`` itself; otherwise the same terms, one per task row."""
        plan = self.plan
        if plan.tasks is None:
            return self.training_step(batch).reshape(1)
        x, y = batch
        phi = self.trainable_parameters()
        values = self.task_losses(self(x), y) + proximal(phi, plan.start, plan.lam, plan.tasks)
        decay = self.settings.inner_weight_decay
        if decay:
            values = values + proximal(phi, None, decay, plan.tasks)
        return values

    def _trial_objectives(self, batch) -> torch.Tensor:
        """g per task at a trial point of a line search: no graph, running statistics untouched."""
        with torch.no_grad(), scratch_buffers(self.module):
            return self.task_objectives(batch).detach()

    def inner_objective(self) -> torch.Tensor:
        """g at the current φ on the inner loop's last batch, as Betty's own steps evaluate it
        (``imaml/solvers/contract.py``), running statistics untouched."""
        with scratch_buffers(self.module):
            out = betty_glue.objective(self, betty_glue.last_batch(self))
        return out["loss"] if isinstance(out, dict) else out

    def solve_exactly(self, b: torch.Tensor) -> Optional[torch.Tensor]:
        """A⁻¹b in closed form for ``--hypergrad exact``: the head's (``problems.head_solve``);
        none for the whole network (the dense solve)."""
        if self.on_features is None:
            return None
        features = self.on_features.features(self.env.support[0]).detach()
        return solve_head_system(features, self.phi, self.env.kind, self.plan.lam + self.settings.inner_weight_decay, b)

    def record_final_gradient(self, grad_rows: torch.Tensor) -> None:
        """∇g(φ_K) per task, from the hypergradient solve (which evaluates it anyway)."""
        self._final_norms = grad_rows.detach().norm(dim=1)

    def stationarity(self) -> torch.Tensor:
        """‖∇g(φ_K)‖ / ‖∇g(φ_0)‖ of each task of the inner loop just run ([T]): near 0 where the
        implicit function theorem applies. Tasks still moving at the last step need ∇g(φ_K): the
        solve's, or one more gradient here (meta-validation and meta-test)."""
        loop = self.inner
        if loop.initial is None:
            return torch.full((self.num_tasks,), float("nan"))
        latest = loop.latest
        if bool(loop.active.any()):
            final = self._final_norms if self._final_norms is not None else self._gradient_norms()
            latest = torch.where(loop.active, final, latest)
        return loop.relative(latest)

    def _gradient_norms(self) -> torch.Tensor:
        params = list(self.trainable_parameters())
        grads = torch.autograd.grad(self.inner_objective(), params, allow_unused=True)
        return task_norms([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)], self.num_tasks)

    def proximal_diagonal(self) -> Optional[torch.Tensor]:
        """λ of each entry of (one task's) φ, flat [n], where it differs by parameter group
        (``--head-lam``); None where one λ holds everywhere. The solvers precondition by it."""
        lam, phi = self.plan.lam, self.trainable_parameters()
        if not isinstance(lam, list):
            return None
        return torch.cat([torch.full(((p[0] if self.plan.tasks else p).numel(),), w, dtype=p.dtype, device=p.device)
                          for w, p in zip(lam, phi)])

    def weakest_lam(self) -> float:
        """The smallest λ of the proximal term: where Hessian-free's damping starts (a stronger
        start would hold back the weakly held output layer of ``--head-lam``)."""
        lam = self.plan.lam
        return min(lam) if isinstance(lam, list) else lam

    def regularizer(self) -> torch.Tensor:
        """λ/2·‖φ − φ₀‖², the proximal term of the iMAML paper (eq. 3), φ₀ the inner loop's start
        (``self.plan``), summed over the tasks."""
        plan = self.plan
        return proximal(self.trainable_parameters(), plan.start, plan.lam)

    def on_inner_loop_start(self) -> None:
        plan = self.plan = self.adaptation()
        self.task_meta_parameters, self._task_rows = plan.theta_rows, None
        if self.on_features is not None:
            self.on_features.forget()
        with torch.no_grad():
            for mine, theirs in zip(self.module.buffers(), self.meta_problem.module.buffers()):
                mine.copy_(theirs)
        if plan.tasks is None:  # one task, the whole network: φ is the module's own parameters
            with torch.no_grad():
                for phi, start in zip(self.module.parameters(), plan.start):
                    if phi.shape == start.shape:
                        phi.copy_(start)
                    else:  # a zero head resized to the task's classes, in place: the optimizer keeps the tensor
                        phi.data = start.detach().clone()
            self.phi = list(self.module.parameters())
        else:  # fresh [T, ...] leaves, stepped by the inner optimizer
            self.phi = self.fresh(plan.start, keep_graph=False)
            self.optimizer.param_groups[0]["params"] = self.phi
        self.optimizer.state.clear()  # no momentum carried over from the previous task


class UnrolledLower(TaskAdaptation, RecomputedSteps, IterativeProblem):
    """MAML's inner problem: differentiable SGD steps from φ₀ = θ (a graph-connected clone).

    Betty wiring that makes this exactly second-order MAML (verified against plain autograd
    in tests): the Upper config has ``first_order=False``; this config has
    ``unroll_steps=K`` and ``retain_graph=True``; every task starts from clones of θ and an
    empty optimizer state (``load_state_dict`` here would cut the graph to θ).

    φ is the tuple ``self.params`` (ordered as ``self.module.named_parameters()``, names in
    ``self._param_names``; stacked, [T, ...] each, run through ``self.grouped``), replaced by a
    new tuple at every inner step; the meta-gradient is
    autograd through all of them. Hooks an extension overrides:

    - ``training_step(batch) -> Tensor``: the inner objective; default the support loss.
    - ``forward(x) -> Tensor``: the model with ``self.params`` (``self.fmodule``).
    - ``trainable_parameters() -> Sequence[Tensor]``: the entries of ``self.params`` the inner
      loop differentiates (default all); the others keep their values, e.g. a frozen encoder.
    - ``custom_optimizer_step() -> tuple``: Betty's hook for the inner update rule; returns
      the next ``self.params`` from ``self.params`` and their ``.grad`` (default:
      ``differentiable_sgd``, the run's inner SGD; entries without a gradient pass through
      unchanged). It must be built from differentiable ops.
    - ``on_inner_loop_start()``: set ``self.params``/``self.buffers`` from θ for a new task;
      in training they must stay connected to θ's graph (``clone``, not ``detach``).
    - ``recomputable``: False if an inner step reads or writes state that ``--grad-checkpoint``
      would not restore when it recomputes the step (see ``problems.unrolled_steps.RecomputedSteps``); default True.

    Leave alone: ``__init__``'s signature, ``patch_modules`` (extend it with ``super()``),
    ``step``, ``one_step_descent``, ``backward``, ``optimizer_step``, ``begin_task``,
    ``get_batch``: the Betty wiring above and the engine's inner loop depend on them.
    """

    def initialize(self, engine_config):
        super().initialize(engine_config)
        betty_glue.set_first_order(self, self.config.first_order)  # Betty derives it from the parent's config
        self.zero_theta_head()

    def patch_modules(self):
        """Functional view of the module with ``torch.func`` (Betty uses the deprecated
        ``functorch.make_functional_with_buffers``); parameter order is unchanged."""
        self.setup_adaptation()
        self._buffer_names = [name for name, _ in self.module.named_buffers()]
        self.params = tuple(self.module.parameters())
        self.buffers = tuple(self.module.buffers())
        self.fmodule = self._functional_forward

    def _functional_forward(self, params, buffers, x):
        tensors = dict(zip(self._param_names, params))
        tensors.update(zip(self._buffer_names, buffers))
        return functional_call(self.module, tensors, (x,))

    def trainable_parameters(self) -> List[torch.Tensor]:
        return [self.params[i] for i in self.adapted_index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on_features is not None:
            return self.on_features.forward(self.trainable_parameters(), x)
        if self.stacked:
            return self.grouped(self.params, x)
        if self.module.training and self.buffers:
            # BatchNorm updates running statistics in place; earlier steps' graphs keep theirs
            self.buffers = tuple(b.clone() for b in self.buffers)
        return self.fmodule(self.params, self.buffers, x)

    def encoder_tensors(self, task: int, support: bool) -> dict:
        """The tensors θ's encoder runs with for ``--adapt head``: θ (detached in evaluation) and
        this inner loop's BatchNorm statistics."""
        theta = self.meta_problem.initial_parameters()
        if not self.in_training:
            theta = [t.detach() for t in theta]
        state = dict(zip(self._param_names, theta))
        state.update(zip(self._buffer_names, self.buffers))
        return state

    def step_reads(self) -> List[torch.Tensor]:
        """With ``--adapt head``, the support features: the steps read θ's encoder only through
        them (θ's head only through the carried start), so a recomputed step differentiates into
        them and stops."""
        return self.on_features.support_features() if self.on_features is not None else super().step_reads()

    def adapted_buffers(self):
        return self.buffers

    # Betty's IterativeProblem.train()/eval() only flip a flag (ImplicitProblem's also switch
    # the module); BatchNorm must follow for the inductive mode.
    def train(self):
        super().train()
        self.module.train()

    def eval(self):
        super().eval()
        self.module.eval()

    def training_step(self, batch) -> torch.Tensor:
        x, y = batch
        return self.support_loss(x, y)

    def on_inner_loop_start(self) -> None:
        """φ from the inner loop's ``Adaptation``: in training, clones that keep the graph to θ
        (a zero start has none: a fresh leaf); the entries that do not adapt are θ's, unused."""
        plan = self.plan = self.adaptation()
        params = [t.detach() for t in self.meta_problem.initial_parameters()]
        for i, start in zip(plan.index, self.fresh(plan.start, keep_graph=self.in_training)):
            params[i] = start
        self.params = tuple(params)
        self.buffers = tuple(b.clone() for b in self.meta_problem.module.buffers())
        for state in self.optimizer.state:
            state.clear()
        if self.on_features is not None:
            self.on_features.forget()
            self.on_features.features(self.env.support[0])  # now, so a recomputed step reads the same tensor

    def one_step_descent(self, batch=None):
        # Betty keeps the inner gradients in ``.grad`` of non-leaf tensors, which torch warns
        # about on every access; the use is deliberate here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
            return super().one_step_descent(batch)

    # Evaluation adapts without building a graph for meta-gradients it will never take.
    def backward(self, loss, params, paths, create_graph=False, retain_graph=True, allow_unused=True):
        super().backward(loss, params, paths, create_graph=create_graph and self.in_training,
                         retain_graph=retain_graph and self.in_training, allow_unused=allow_unused)

    def custom_optimizer_step(self, *args, **kwargs) -> tuple:
        return differentiable_sgd(self.params, self.optimizer)

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        if not self.in_training:
            self.params = tuple(p.detach().requires_grad_() for p in self.params)
