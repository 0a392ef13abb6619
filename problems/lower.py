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
from dataclasses import dataclass
from typing import ClassVar, List, Optional, Sequence, Type

import torch
from betty.configs import Config
from betty.problems import ImplicitProblem, IterativeProblem
from torch.func import functional_call

from imaml import betty_glue, solvers
from imaml.inner_optimizers import INNER_OPTIMIZERS, NEEDS_HVP, InnerLoop, InnerStep, rows, task_norms
from imaml.metrics import global_norm, task_loss
from imaml.models import predict_query, scratch_buffers
from imaml.recompute import recompute_in_backward
from problems.upper import MetaInit

__all__ = ["LowerConfig", "ImplicitLower", "UnrolledLower", "differentiable_sgd"]


@dataclass
class LowerConfig(Config):
    """Betty's problem ``Config`` plus what our inner loop and solvers read.

    For the Lower problem, ``first_order`` means first-order MAML (inner gradients are not
    differentiated); it has no effect on ``ImplicitLower``.
    """

    type: str = "imaml_cg"
    first_order: bool = False
    lam: float = 1.0
    weight_decay: float = 0.0  # iMAML: part of the inner objective, so the implicit gradient sees it
    cg_tol: float = 1e-5
    cg_trust_region: bool = True  # ‖x‖ ≤ ‖v‖/λ, see imaml.solvers.trust_radius
    cg_damping: float = 0.0  # cg-damped: μ in (A + μI) x = v
    inner_optimizer: str = "sgd"  # iMAML: sgd, armijo or hessian-free (imaml.inner_optimizers)
    inner_tol: float = 1e-2  # iMAML: a task stops once ‖∇g(φ_k)‖ ≤ tol·‖∇g(φ_0)‖
    inner_cg_steps: int = 5  # iMAML hessian-free: CG steps per Newton direction
    neumann_alpha: Optional[float] = None  # None: 1/λ_max by power iteration
    grad_checkpoint: bool = False  # UnrolledLower: recompute each inner step in the backward pass


class _TaskAdaptation:
    """What both Lower problems share: the data they read and how a task starts.

    Class attributes an extension may set:

    - ``upper_class``: the Upper problem this Lower needs (e.g. Meta-SGD's, which holds the
      learned learning rates); the builder uses it when no ``--upper-problem`` is given and
      rejects an Upper that is not a subclass of it.
    - ``variable_ways``: True if the Lower adapts to tasks with any number of classes (a
      head it creates per task), so ``--test-ways`` may differ from ``--ways``.
    """

    upper_class: ClassVar[Type[MetaInit]] = MetaInit
    variable_ways: ClassVar[bool] = False

    num_tasks = 1  # tasks adapted at once (stacked along dim 0 by problems.vectorized)

    @property
    def in_training(self) -> bool:
        """Meta-training (True) or evaluation (False): Betty's mode of this problem."""
        return betty_glue.is_training(self)

    @property
    def meta_problem(self):
        """The Upper problem holding θ (Betty's parent in the dependency graph)."""
        return self.parents[0]

    def get_batch(self):
        return self.env.support

    def support_loss(self, x, y):
        """The task loss on the support set (summed over tasks when they are stacked)."""
        return task_loss(self.env.kind, self(x), y)

    def adapted_norms(self) -> torch.Tensor:
        """‖φ‖ of each task being adapted ([1] here; one per task when tasks are stacked)."""
        return global_norm(self.trainable_parameters()).reshape(1)

    def begin_task(self) -> None:
        """Make the next ``step()`` start a fresh inner loop from θ, in any mode. (Betty only
        re-arms this after a training inner loop hands over to the Upper problem.)"""
        betty_glue.restart_inner_loop(self)
        self.inner_losses = []

    def one_step_descent(self, batch=None):
        """Betty's inner step, keeping the objective it minimized (for the inner-loop curves)."""
        loss_dict = super().one_step_descent(batch)
        self.inner_losses.append(loss_dict["loss"] / self.num_tasks)  # per task
        return loss_dict

    def predict(self, query_x: torch.Tensor) -> torch.Tensor:
        """The adapted model's predictions for the current task's queries (episodic BatchNorm
        takes its statistics from the support set, so that travels along)."""
        return predict_query(self, self.module, self.env.current.support_x, query_x)

    def adapted_buffers(self):
        """The buffers the adapted model ran with (BatchNorm running statistics)."""
        return self.module.buffers()

    def finish_task(self) -> None:
        """After a meta-training task: keep the running statistics its forward passes
        accumulated (inductive BatchNorm), so they carry over to the next task and to
        meta-test. Non-finite statistics (a diverged task) are dropped."""
        if not self.in_training:
            return
        mine = list(self.adapted_buffers())
        if all(torch.isfinite(b).all() for b in mine if b.is_floating_point()):
            with torch.no_grad():
                for stored, new in zip(self.meta_problem.module.buffers(), mine):
                    stored.copy_(new)


class ImplicitLower(_TaskAdaptation, ImplicitProblem):
    """iMAML's inner problem: minimize  L_support(φ) + λ/2·‖φ − θ‖²  from φ = θ with
    ``config.inner_optimizer`` (SGD, or a line-search method of ``imaml.inner_optimizers``),
    each task stopping at ``config.inner_tol`` stationarity (``stationarity()`` reports it).

    φ is ``self.module``'s parameters, updated in place; the
    meta-gradient is the implicit one at the adapted φ, for whatever objective
    ``training_step`` returns: −(∂²g/∂θ∂φ)(∂²g/∂φ²)⁻¹ ∇φ L_query, plus the direct ∂L_query/∂θ
    if ``forward`` uses θ itself (see ``problems/anil.py``).

    Hooks an extension overrides (call ``super()`` where it extends rather than replaces):

    - ``training_step(batch) -> Tensor``: the inner objective g(φ, θ); default task loss +
      ``regularizer()``. (``task_objectives(batch)``, g per task for the line searches, calls it.)
    - ``regularizer() -> Tensor``: the coupling to θ; default λ/2·‖φ − θ‖² over
      ``trainable_parameters()``. It must be twice differentiable with a non-zero ∂²g/∂θ∂φ,
      or θ gets no meta-gradient (an L1 term has zero curvature: use it with unrolled MAML).
    - ``forward(x) -> Tensor``: the adapted model's output (support, query and meta-test).
    - ``trainable_parameters() -> list``: the part of φ the inner loop adapts and the solver
      differentiates (default: all of ``self.module``'s parameters).
    - ``on_inner_loop_start()``: set φ from θ at the start of every task (default: copy θ's
      parameters and buffers, clear the optimizer state).

    Leave alone: ``__init__``'s signature (the builder calls it as here), ``step``,
    ``one_step_descent``, ``backward``, ``optimizer_step``, ``begin_task``, ``get_batch``:
    Betty's plumbing and the engine's inner loop depend on them.
    """

    def __init__(self, name, config: LowerConfig, module, optimizer, device=None):
        solvers.install()  # the corrected solvers named by config.type (under our own keys)
        super().__init__(name, config, module=module, optimizer=optimizer, device=device)
        self.hypergrad_infos: list = []  # the solver's SolveInfo of each task of the last inner loop
        self.inner = InnerLoop(config.inner_tol)
        self._final_norms: Optional[torch.Tensor] = None

    def begin_task(self) -> None:
        super().begin_task()
        self.hypergrad_infos = []
        self.inner = InnerLoop(self.config.inner_tol)
        self._final_norms = None

    def one_step_descent(self, batch=None):
        """One step of ``config.inner_optimizer`` on g, for the tasks not yet within
        ``config.inner_tol`` (``imaml.inner_optimizers``); once all are, the loop's remaining
        steps are no-ops, so Betty's step count (and its hand-over to the Upper problem) stays."""
        batch = self.get_batch() if batch is None else batch
        betty_glue.remember_batch(self, batch)
        if self.inner.done:
            self.inner_losses.append(self.inner_losses[-1])
            return {"loss": self.inner_losses[-1] * self.num_tasks}
        name = self.config.inner_optimizer
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
                             lr=self.optimizer.param_groups[0]["lr"], lam=self.config.lam,
                             cg_steps=self.config.inner_cg_steps, grads=grads,
                             hvp=lambda u: rows(torch.autograd.grad(grad_rows, params, u, retain_graph=True), self.num_tasks))
            INNER_OPTIMIZERS[name](step, self.optimizer)
        return {"loss": total}

    def task_objectives(self, batch) -> torch.Tensor:
        """g of each task being adapted, [T] (here T = 1: ``training_step``); the line searches
        compare these per task."""
        return self.training_step(batch).reshape(1)

    def _trial_objectives(self, batch) -> torch.Tensor:
        """g per task at a trial point of a line search: no graph, running statistics untouched."""
        with torch.no_grad(), scratch_buffers(self.module):
            return self.task_objectives(batch).detach()

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
        with scratch_buffers(self.module):
            grads = torch.autograd.grad(betty_glue.objective(self, betty_glue.last_batch(self)), params,
                                        allow_unused=True)
        return task_norms([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)], self.num_tasks)

    def training_step(self, batch) -> torch.Tensor:
        x, y = batch
        loss = self.support_loss(x, y) + self.regularizer()
        if self.config.weight_decay:  # inner weight decay is part of the objective the solver sees
            loss = loss + 0.5 * self.config.weight_decay * sum(phi.pow(2).sum() for phi in self.trainable_parameters())
        return loss

    def anchor(self) -> List[torch.Tensor]:
        """θ as the proximal term sees it (a task-vectorized problem stacks it per task)."""
        return self.meta_problem.initial_parameters()

    def regularizer(self) -> torch.Tensor:
        """λ/2·‖φ − θ‖², the proximal term of the iMAML paper (eq. 3)."""
        proximal = sum((phi - t).pow(2).sum() for phi, t in zip(self.trainable_parameters(), self.anchor()))
        return 0.5 * self.config.lam * proximal

    def on_inner_loop_start(self) -> None:
        with torch.no_grad():
            for phi, theta in zip(self.module.parameters(), self.meta_problem.module.parameters()):
                phi.copy_(theta)
            for mine, theirs in zip(self.module.buffers(), self.meta_problem.module.buffers()):
                mine.copy_(theirs)
        self.optimizer.state.clear()  # no momentum carried over from the previous task


class _RecomputedSteps:
    """With ``config.grad_checkpoint``, each differentiable inner step keeps only its input for
    the backward pass and recomputes its own graph there, so memory holds K copies of φ (and
    of any momentum buffers) plus one step's graph instead of K steps' graphs.

    The step recomputed is Betty's own ``one_step_descent``, so it goes through the same hooks
    as without checkpointing (``training_step``, ``forward``, ``trainable_parameters``,
    ``backward``, ``custom_optimizer_step``, ``param_callback``) and gives the same
    meta-gradient for any Lower problem that keeps its state where this looks for it: φ in
    ``self.params``, BatchNorm statistics in ``self.buffers``, optimizer state (momentum) in
    ``self.optimizer.state``, and meta-parameters it reads directly (Meta-SGD's rates) among
    the Upper problem's ``trainable_parameters()``. A class that keeps other state across
    inner steps sets ``recomputable = False``; the builder then refuses ``--grad-checkpoint``.
    """

    recomputable: ClassVar[bool] = True

    def one_step_descent(self, batch=None):
        if not (self.config.grad_checkpoint and self.in_training and betty_glue.differentiates_inner_steps(self)):
            return super().one_step_descent(batch)
        batch = self.get_batch() if batch is None else batch
        betty_glue.remember_batch(self, batch)
        n_params, buffers, state = len(self.params), self.buffers, self.optimizer.state
        slots = _tensor_slots(state)
        plain_step = super().one_step_descent

        def step(carried):  # runs again in the backward pass: leaves everything as it was
            saved = self.params, self.buffers, self.optimizer.state
            self.params, self.buffers = tuple(carried[:n_params]), buffers
            self.optimizer.state = _with_tensors(state, slots, carried[n_params:])
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
                    loss_dict = plain_step(batch)
                new_state = self.optimizer.state
                new_slots = _tensor_slots(new_state)
                new = (*self.params, *(new_state[i][key] for i, key in new_slots))
                return new, (loss_dict, self.buffers, new_state, new_slots)
            finally:
                self.params, self.buffers, self.optimizer.state = saved
                for t in carried:  # Betty's zero_grad clears the new φ's: the input's .grad and its graph
                    t.grad = None  # would hold each other (and the step's graph) alive forever

        carried = (*self.params, *(state[i][key] for i, key in slots))
        new, (loss_dict, self.buffers, new_state, new_slots) = recompute_in_backward(
            step, carried, reads=self.meta_problem.trainable_parameters())
        self.params = new[:n_params]
        self.optimizer.state = _with_tensors(new_state, new_slots, new[n_params:])
        return loss_dict


def _tensor_slots(state: list) -> List[tuple]:
    """(entry, key) of every tensor in a patched optimizer's per-parameter state dicts."""
    return [(i, key) for i, entries in enumerate(state) for key, value in (entries or {}).items()
            if torch.is_tensor(value)]


def _with_tensors(state: list, slots: List[tuple], tensors: Sequence[torch.Tensor]) -> list:
    """A copy of ``state`` (new dicts) with ``tensors`` at ``slots``."""
    out = [None if entries is None else dict(entries) for entries in state]
    for (i, key), tensor in zip(slots, tensors):
        out[i][key] = tensor
    return out


class UnrolledLower(_TaskAdaptation, _RecomputedSteps, IterativeProblem):
    """MAML's inner problem: differentiable SGD steps from φ₀ = θ (a graph-connected clone).

    Betty wiring that makes this exactly second-order MAML (verified against plain autograd
    in tests): the Upper config has ``first_order=False``; this config has
    ``unroll_steps=K`` and ``retain_graph=True``; every task starts from clones of θ and an
    empty optimizer state (``load_state_dict`` here would cut the graph to θ).

    φ is the tuple ``self.params`` (ordered as ``self.module.named_parameters()``, names in
    ``self._param_names``), replaced by a new tuple at every inner step; the meta-gradient is
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
      would not restore when it recomputes the step (see ``_RecomputedSteps``); default True.

    Leave alone: ``__init__``'s signature, ``patch_modules`` (extend it with ``super()``),
    ``step``, ``one_step_descent``, ``backward``, ``optimizer_step``, ``begin_task``,
    ``get_batch``: the Betty wiring above and the engine's inner loop depend on them.
    """

    def initialize(self, engine_config):
        super().initialize(engine_config)
        betty_glue.set_first_order(self, self.config.first_order)  # Betty derives it from the parent's config

    def patch_modules(self):
        """Functional view of the module with ``torch.func`` (Betty uses the deprecated
        ``functorch.make_functional_with_buffers``); parameter order is unchanged."""
        self._param_names = [name for name, _ in self.module.named_parameters()]
        self._buffer_names = [name for name, _ in self.module.named_buffers()]
        self.params = tuple(self.module.parameters())
        self.buffers = tuple(self.module.buffers())
        self.fmodule = self._functional_forward

    def _functional_forward(self, params, buffers, x):
        tensors = dict(zip(self._param_names, params))
        tensors.update(zip(self._buffer_names, buffers))
        return functional_call(self.module, tensors, (x,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.module.training and self.buffers:
            # BatchNorm updates running statistics in place; earlier steps' graphs keep theirs
            self.buffers = tuple(b.clone() for b in self.buffers)
        return self.fmodule(self.params, self.buffers, x)

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
        theta = self.meta_problem.initial_parameters()
        if self.in_training:
            self.params = tuple(t.clone() for t in theta)  # keeps the graph to θ
        else:
            self.params = tuple(t.detach().clone().requires_grad_() for t in theta)
        self.buffers = tuple(b.clone() for b in self.meta_problem.module.buffers())
        for state in self.optimizer.state:
            state.clear()

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


def differentiable_sgd(params: Sequence[torch.Tensor], optimizer) -> tuple:
    """``torch.optim.SGD``'s update (weight decay, momentum, dampening, Nesterov) of the entries
    of ``params`` that have a ``.grad``, from differentiable ops; the others pass through.

    ``optimizer`` is Betty's patched inner optimizer (``param_groups``, ``param_mappings`` into
    ``params``, a ``state`` dict per entry for the momentum buffer). Betty's own
    DifferentiableSGD computes 0·buf + 1·∇ at momentum 0 — two more products per parameter and
    step, kept in the graph the meta-gradient backpropagates through — and drops entries
    without a gradient from the tuple it returns.
    """
    new = list(params)
    for group, mapping in zip(optimizer.param_groups, betty_glue.parameter_indices(optimizer)):
        lr, weight_decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
        for i in mapping:
            grad = params[i].grad
            if grad is None:
                continue
            if weight_decay:
                grad = grad + weight_decay * params[i]
            if momentum:
                state = optimizer.state[i]
                buf = state.get("momentum_buffer")
                buf = grad if buf is None else momentum * buf + (1 - group["dampening"]) * grad
                state["momentum_buffer"] = buf
                grad = grad + momentum * buf if group["nesterov"] else buf
            new[i] = params[i] - lr * grad
    return tuple(new)
