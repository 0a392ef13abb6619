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
from typing import List, Optional, Union

import torch
from betty.problems import ImplicitProblem, IterativeProblem
from torch.func import functional_call

from imaml import betty_glue, solvers
from imaml.inner_optimizers import INNER_OPTIMIZERS, NEEDS_HVP, InnerLoop, InnerStep, rows, task_norms
from imaml.models import scratch_buffers
from imaml.vectorize import stack_for_tasks
from problems.adaptation import LowerConfig, TaskAdaptation, head_start, proximal
from problems.unrolled_steps import RecomputedSteps, differentiable_sgd

__all__ = ["LowerConfig", "ImplicitLower", "UnrolledLower", "differentiable_sgd"]


class ImplicitLower(TaskAdaptation, ImplicitProblem):
    """iMAML's inner problem: minimize  L_support(φ) + λ/2·‖φ − θ‖²  from φ = θ with
    ``config.inner_optimizer`` (SGD, or a line-search method of ``imaml.inner_optimizers``),
    each task stopping at ``config.inner_tol`` stationarity (``stationarity()`` reports it).

    φ is ``self.module``'s parameters, updated in place (stacked, ``self.phi``: [T, ...] leaves
    started from θ's rows, run through ``self.grouped``); the
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
        self._zero_started = self.zero_started_index()
        self.phi: list = []  # stacked: φ, [T, ...] per parameter (unstacked, φ is the module's own)
        self.task_meta_parameters = None  # stacked: the per-task views of θ the proximal term used last

    def trainable_parameters(self):
        return self.phi if self.stacked else super().trainable_parameters()

    def parameters(self):
        return self.phi if self.stacked else super().parameters()

    def forward(self, x):
        return self.grouped(self.phi, x) if self.stacked else super().forward(x)

    def initialize(self, engine_config):
        super().initialize(engine_config)
        self.zero_theta_head()

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
                             lr=self.optimizer.param_groups[0]["lr"], lam=self.weakest_lam(),
                             cg_steps=self.config.inner_cg_steps, grads=grads,
                             proximal_diagonal=self.proximal_diagonal(),
                             hvp=lambda u: rows(torch.autograd.grad(grad_rows, params, u, retain_graph=True), self.num_tasks))
            INNER_OPTIMIZERS[name](step, self.optimizer)
        return {"loss": total}

    def task_objectives(self, batch) -> torch.Tensor:
        """g of each task being adapted, [T] (unstacked, T = 1: ``training_step``); the line
        searches compare these per task."""
        if self.stacked:
            return self.stacked_objectives(batch)
        return self.training_step(batch).reshape(1)

    def stacked_objectives(self, batch) -> torch.Tensor:
        """g_t(φ_t) = L_support,t + λ/2·‖φ_t − φ₀,t‖² (+ weight decay) of each task row, [T]: the
        ``task_objectives`` of the problems whose parameters carry a task dimension."""
        x, y = batch
        phi, tasks = self.trainable_parameters(), self.num_tasks
        values = self.task_losses(self(x), y) + proximal(phi, self.anchor(), self.proximal_weights(), tasks)
        if self.config.weight_decay:
            values = values + proximal(phi, None, self.config.weight_decay, tasks)
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
        """A⁻¹b in closed form for ``--hypergrad exact``: none for the whole network (the dense
        solve); the head's is ``problems.head_solve``."""
        return None

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

    def training_step(self, batch) -> torch.Tensor:
        x, y = batch
        loss = self.support_loss(x, y) + self.regularizer()
        if self.config.weight_decay:  # inner weight decay is part of the objective the solver sees
            loss = loss + proximal(self.trainable_parameters(), None, self.config.weight_decay)
        return loss

    @property
    def inner_lam(self) -> float:
        """λ of the inner objective now: ``lam``, or ``test_lam`` in evaluation where it is set
        (the official code adapts without the proximal term at meta-test: ``--test-lam 0``)."""
        test_lam = getattr(self.config, "test_lam", None)
        return self.config.lam if self.in_training or test_lam is None else test_lam

    def proximal_weights(self) -> Union[float, List[float]]:
        """λ of each tensor of φ in the proximal term: ``inner_lam`` everywhere, or ``head_lam``
        on the output layer (``--head-lam``; not where ``test_lam`` replaces every λ)."""
        head_lam = getattr(self.config, "head_lam", None)
        if head_lam is None or (not self.in_training and getattr(self.config, "test_lam", None) is not None):
            return self.inner_lam
        head = set(self.find_head_names())
        return [head_lam if name in head else self.inner_lam for name, _ in self.module.named_parameters()]

    def proximal_diagonal(self) -> Optional[torch.Tensor]:
        """λ of each entry of (one task's) φ, flat [n], where it differs by parameter group
        (``--head-lam``); None where one λ holds everywhere. The solvers precondition by it."""
        weights = self.proximal_weights()
        if not isinstance(weights, list) or len(set(weights)) == 1:
            return None
        phi = self.trainable_parameters()
        return torch.cat([torch.full(((p[0] if self.stacked else p).numel(),), w, dtype=p.dtype, device=p.device)
                          for w, p in zip(weights, phi)])

    def weakest_lam(self) -> float:
        """The smallest λ of the proximal term: where Hessian-free's damping starts (a stronger
        start would hold back the weakly held output layer of ``--head-lam``)."""
        weights = self.proximal_weights()
        return min(weights) if isinstance(weights, list) else weights

    def anchor(self) -> List[torch.Tensor]:
        """Where each task starts, the proximal centre: θ, with a zero-started head's entries at
        zero; stacked, per-task views of θ ([T, ...]), from which the solver reads each task's
        hypergradient."""
        if self.stacked:
            self.task_meta_parameters = stack_for_tasks(self.meta_problem.trainable_parameters(), self.num_tasks)
            theta = self.task_meta_parameters
            phi = self.phi
        else:
            theta = self.meta_problem.initial_parameters()
            phi = list(self.module.parameters())
        return [torch.zeros_like(phi[i]) if i in self._zero_started else t for i, t in enumerate(theta)]

    def regularizer(self) -> torch.Tensor:
        """λ/2·‖φ − φ₀‖², the proximal term of the iMAML paper (eq. 3), φ₀ = ``anchor()``."""
        return proximal(self.trainable_parameters(), self.anchor(), self.proximal_weights())

    def on_inner_loop_start(self) -> None:
        if self.count_tasks() and self.stacked:  # fresh [T, ...] leaves, stepped by the inner optimizer
            theta = [t.detach() for t in self.meta_problem.trainable_parameters()]
            self.phi = [t.clone().requires_grad_() for t in self.stacked_start(theta)]
            self.optimizer.param_groups[0]["params"] = self.phi
            self.optimizer.state.clear()
            return
        ways = self.task_ways() if self._zero_started else 0
        with torch.no_grad():
            for i, (phi, theta) in enumerate(zip(self.module.parameters(), self.meta_problem.module.parameters())):
                if i in self._zero_started:  # resized in place: the optimizer keeps the same tensor
                    phi.data = head_start([theta], "zero", ways)[0]
                else:
                    phi.copy_(theta)
            for mine, theirs in zip(self.module.buffers(), self.meta_problem.module.buffers()):
                mine.copy_(theirs)
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
        self._param_names = [name for name, _ in self.module.named_parameters()]
        self._buffer_names = [name for name, _ in self.module.named_buffers()]
        self.params = tuple(self.module.parameters())
        self.buffers = tuple(self.module.buffers())
        self.fmodule = self._functional_forward
        self._zero_started = self.zero_started_index()

    def _functional_forward(self, params, buffers, x):
        tensors = dict(zip(self._param_names, params))
        tensors.update(zip(self._buffer_names, buffers))
        return functional_call(self.module, tensors, (x,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stacked:
            return self.grouped(self.params, x)
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
        if self.count_tasks() and self.stacked:
            stacked = self.stacked_start(self.meta_problem.trainable_parameters())
            if self.in_training:  # keeps the graph to θ (a zero start has none: a fresh leaf)
                self.params = tuple(t.clone() if t.requires_grad else t.requires_grad_() for t in stacked)
            else:
                self.params = tuple(t.detach().clone().requires_grad_() for t in stacked)
            self.buffers = ()  # vectorizable models have none
            for state in self.optimizer.state:
                state.clear()
            return
        theta = self.meta_problem.initial_parameters()
        if self.in_training:
            self.params = tuple(t.clone() for t in theta)  # keeps the graph to θ
        else:
            self.params = tuple(t.detach().clone().requires_grad_() for t in theta)
        if self._zero_started:  # a zero-started head: fresh leaves with the task's classes as rows
            params, ways = list(self.params), self.task_ways()
            for i in self._zero_started:
                params[i] = head_start([params[i]], "zero", ways)[0].requires_grad_()
            self.params = tuple(params)
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
