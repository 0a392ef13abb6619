"""The adaptation core as data: what one inner loop adapts, where it starts and how it is held.

``plan_adaptation`` is one pure function from θ, the settings and the task to an ``Adaptation``:
which of θ's tensors adapt (``--adapt``: all, or the output layer alone), each one's start and
proximal centre (θ's, or zeros sized to the task's classes: ``--head-init``), λ per tensor
(``--lam``, ``--head-lam``, ``--test-lam``) and T, the tasks stacked along dim 0 of φ. Both Lower
problems (``problems.lower``) reset from it and write their inner objective over it once, for
one task and for a stacked meta-batch alike.

A Lower problem adapts the T tasks of one inner loop: one at a time (T = 1) or, when the builder
sets ``tasks_at_once = None``, a whole meta-batch stacked along dim 0 (``stacked``: φ is [T, ...]
per parameter, the model runs every task at once with its own parameters through
``imaml.vectorize.TaskGroupedModel``, and the objective is the sum of the per-task objectives,
so each φ_t gets exactly its own task's gradient). With ``--adapt head`` φ always carries the
task dimension and the model's forward is the head on θ's features (``problems.features``).
Either way it reports per-task tensors of one shape, [T]: ``task_losses``, ``task_scores``,
``adapted_norms``, ``stationarity`` and, after a solve, ``hypergrad_infos`` (T of them), which is
all the engine, the divergence guard and the records read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Optional, Sequence, Type, Union

import torch
from betty.configs import Config
from torch import nn

from imaml import betty_glue
from imaml.config import RunConfig
from imaml.errors import UsageError
from imaml.metrics import global_norm, stacked_losses, stacked_scores, task_loss, task_score
from imaml.models import predict_query
from imaml.vectorize import TaskGroupedModel, stack_for_tasks
from problems.features import HeadOnFeatures
from problems.head import find_head
from problems.upper import MetaInit

__all__ = ["LowerConfig", "Adaptation", "plan_adaptation", "TaskAdaptation", "proximal", "head_start"]

Lam = Union[float, List[float]]


def proximal(phi: Sequence[torch.Tensor], centre: Optional[Sequence[torch.Tensor]], lam: Lam,
             tasks: Optional[int] = None) -> torch.Tensor:
    """λ/2·‖φ − c‖², the proximal term of the iMAML paper (eq. 3), written once for every
    Lower problem (``centre`` None: c = 0, the inner weight decay): summed over everything, or
    with ``tasks`` one value per task row ([T]). ``lam`` is one λ, or one per tensor of φ
    (``--head-lam``: another λ on the output layer)."""
    gaps = phi if centre is None else [p - c for p, c in zip(phi, centre)]
    squares = [g.pow(2).sum() if tasks is None else g.pow(2).reshape(tasks, -1).sum(1) for g in gaps]
    if isinstance(lam, (int, float)):  # one λ: one product, not one per tensor
        return 0.5 * lam * sum(squares)
    return 0.5 * sum(w * q for w, q in zip(lam, squares))


def head_start(theta_head: Sequence[torch.Tensor], head_init: str, ways: int,
               tasks: Optional[int] = None) -> List[torch.Tensor]:
    """Where a task's head starts (``--head-init``): θ's head, or zeros with ``ways`` rows (one
    per class of the task, so meta-test may have another number of ways). With ``tasks``, a
    leading task dimension ([T, ...]: views of θ's, or fresh zeros)."""
    if head_init == "zero":
        lead = () if tasks is None else (tasks,)
        return [torch.zeros((*lead, ways, *t.shape[1:]), dtype=t.dtype, device=t.device) for t in theta_head]
    return list(theta_head) if tasks is None else stack_for_tasks(theta_head, tasks)


@dataclass
class Adaptation:
    """One inner loop's adaptation, as data (``plan_adaptation`` makes it)."""

    index: List[int]  # positions in θ (``module.named_parameters()``) of the tensors that adapt
    start: List[torch.Tensor]  # φ₀ of each, also its proximal centre: θ's (graph to θ in training) or zeros
    lam: Lam  # λ of the proximal term: one, or one per adapted tensor
    tasks: Optional[int]  # T where φ carries a task dimension ([T, ...]), None where φ is shaped as θ
    theta_rows: Optional[List[torch.Tensor]]  # in training with a task dimension: θ's per-task views [T, ...]


def plan_adaptation(theta: Sequence[torch.Tensor], head: Sequence[bool], *, adapt: str, head_init: str,
                    ways: int, tasks: Optional[int], training: bool, lam: float = 0.0,
                    head_lam: Optional[float] = None, test_lam: Optional[float] = None) -> Adaptation:
    """The ``Adaptation`` of one inner loop, from θ (the Upper problem's tensors), which of them are
    the output layer (``head``), the settings and the task: its classes (``ways``) and the tasks
    stacked (``tasks``, or None for one task with φ shaped as θ). In evaluation nothing keeps a
    graph to θ, and ``test_lam`` (where set) replaces every λ."""
    theta = list(theta) if training else [t.detach() for t in theta]
    rows = stack_for_tasks(theta, tasks) if tasks is not None else None
    source = theta if rows is None else rows
    index = [i for i, is_head in enumerate(head) if is_head or adapt == "all"]
    start = []
    for i in index:
        if head[i] and head_init == "zero":
            start.append(head_start([theta[i]], "zero", ways, tasks)[0])
        else:
            start.append(source[i])
    evaluation_lam = not training and test_lam is not None
    base = test_lam if evaluation_lam else lam
    lams = [head_lam if head[i] and head_lam is not None and not evaluation_lam else base for i in index]
    return Adaptation(index, start, lams if len(set(lams)) > 1 else base, tasks,
                      rows if training else None)


@dataclass
class LowerConfig(Config):
    """Betty's problem ``Config`` (how Betty steps and differentiates this problem: ``type``, the
    solver's dispatch key; ``unroll_steps``; ``first_order``, for the Lower problem first-order
    MAML; ``retain_graph``) plus ``run``, the run's settings, which the Lower problems and the
    solvers read by their own names (``--lam`` is ``run.lam``)."""

    run: RunConfig = field(default_factory=RunConfig)


class TaskAdaptation:
    """What both Lower problems share: the settings, the data they read, the adaptation plan of
    each inner loop and the per-task numbers they report.

    Class attributes an extension may set:

    - ``upper_class``: the Upper problem this Lower needs (e.g. Meta-SGD's, which holds the
      learned learning rates); the builder uses it when no ``--upper-problem`` is given and
      rejects an Upper that is not a subclass of it.
    - ``variable_ways``: True if the Lower adapts to tasks with any number of classes (a
      head it creates per task), so ``--test-ways`` may differ from ``--ways``.
    - ``stackable``: True if the class's hooks also work on a stacked meta-batch (``stacked``:
      inputs [T, B, ...], φ [T, ...] per parameter), so ``--execution vectorized`` may run it;
      the built-in problems are, an extension is not unless it says so.
    """

    upper_class: ClassVar[Type[MetaInit]] = MetaInit
    variable_ways: ClassVar[bool] = False
    # a class that always adapts one way sets these (the earlier import paths: problems.anil,
    # problems.zero_head); otherwise the settings decide (--adapt, --head-init)
    fixed_adapt: ClassVar[Optional[str]] = None
    fixed_head_init: ClassVar[Optional[str]] = None

    # tasks of a meta-batch one inner loop adapts: 1 (one at a time, unstacked), or None (the
    # whole meta-batch at once, stacked along dim 0), set on the instance by the builder
    tasks_at_once: Optional[int] = 1
    stackable: ClassVar[bool] = False
    num_tasks = 1  # T, the tasks of the current inner loop
    hypergrad_infos: Sequence = ()  # after a solve (iMAML): the solver's SolveInfo of each task
    plan: Optional[Adaptation] = None  # the current inner loop's adaptation
    on_features: Optional[HeadOnFeatures] = None  # --adapt head: the forward on θ's features

    @property
    def settings(self) -> RunConfig:
        """The run's settings (``config.run``)."""
        return self.config.run

    @property
    def head_init(self) -> str:
        """Where each task's head starts: "theta" (θ's head) or "zero" (zeros, one row per class)."""
        return self.fixed_head_init or self.settings.head_init

    @property
    def adapt(self) -> str:
        """What the inner loop adapts: "all" (the whole network) or "head" (the output layer on θ's features)."""
        return self.fixed_adapt or self.settings.adapt

    def setup_adaptation(self) -> None:
        """Which of the module's parameters are the output layer, and ``--adapt head``'s forward:
        when the problem is built, and again at each inner loop (a test may swap layers)."""
        name, layer = find_head(self.module)
        if self.head_init == "zero" and not isinstance(layer, nn.Linear):
            raise UsageError(f"--head-init zero needs an output layer that is one nn.Linear; "
                             f"{type(self.module).__name__}.{name} is a {type(layer).__name__}")
        self._param_names = [n for n, _ in self.module.named_parameters()]
        self.head_mask = [n.startswith(name + ".") for n in self._param_names]
        self.adapted_index = [i for i, is_head in enumerate(self.head_mask) if is_head or self.adapt == "all"]
        self.on_features = HeadOnFeatures(self, name, layer) if self.adapt == "head" else None

    def adaptation(self) -> Adaptation:
        """This inner loop's ``Adaptation``: T counted, θ read from the Upper problem."""
        self.setup_adaptation()
        tasks = self.count_tasks()
        settings = self.settings
        return plan_adaptation(self.meta_problem.initial_parameters(), self.head_mask, adapt=self.adapt,
                               head_init=self.head_init, ways=self.task_ways() if self.head_init == "zero" else 0,
                               tasks=tasks if self.stacked or self.on_features else None,
                               training=self.in_training, lam=settings.lam, head_lam=settings.head_lam,
                               test_lam=settings.test_lam)

    def task_ways(self) -> int:
        """Outputs the current task(s) need: the number of classes (labels are 0..N−1, every
        class in the support set), or the model's output size for regression."""
        if self.env.kind == "classification":
            return int(self.env.current.support_y.max()) + 1
        return find_head(self.meta_problem.module)[1].out_features

    def zero_theta_head(self) -> None:
        """With a zero-started head, θ's head is a placeholder that never gets a meta-gradient:
        zero it once, so the saved θ says what every task starts from."""
        if self.head_init != "zero":
            return
        with torch.no_grad():
            for is_head, theta in zip(self.head_mask, self.meta_problem.module.parameters()):
                if is_head:
                    theta.zero_()

    def fresh(self, start: Sequence[torch.Tensor], keep_graph: bool) -> List[torch.Tensor]:
        """φ₀ as tensors the inner loop may step: clones that keep their graph to θ where
        ``keep_graph`` (unrolled meta-training), else new leaves."""
        return [s.clone() if keep_graph and s.requires_grad else s.detach().clone().requires_grad_() for s in start]

    @property
    def in_training(self) -> bool:
        """Meta-training (True) or evaluation (False): Betty's mode of this problem."""
        return betty_glue.is_training(self)

    @property
    def stacked(self) -> bool:
        """Inputs and φ carry a task dimension ([T, ...]): a whole meta-batch adapts at once."""
        return self.tasks_at_once is None

    def count_tasks(self) -> int:
        """T for the inner loop about to run: the current meta-batch's tasks, or 1."""
        self.num_tasks = self.env.support[0].shape[0] if self.stacked else 1
        return self.num_tasks

    @property
    def grouped(self) -> TaskGroupedModel:
        """The model run for T tasks at once, each with its own parameters (stacked mode)."""
        if getattr(self, "_grouped", None) is None:
            self._grouped = TaskGroupedModel(self.module)
        return self._grouped

    @property
    def meta_problem(self):
        """The Upper problem holding θ (Betty's parent in the dependency graph)."""
        return self.parents[0]

    def get_batch(self):
        return self.env.support

    def support_loss(self, x, y):
        """The task loss on the support set; stacked, Σ_t L_support,t(φ_t), so the sum gives
        each φ_t its own task's gradient."""
        if self.stacked:
            return stacked_losses(self.env.kind, self(x), y).sum()
        return task_loss(self.env.kind, self(x), y)

    def task_losses(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of each task of the inner loop, [T] (T = 1 unstacked)."""
        if self.stacked:
            return stacked_losses(self.env.kind, output, target)
        return task_loss(self.env.kind, output, target).reshape(1)

    def task_scores(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Accuracy (classification) or MSE of each task of the inner loop, [T]."""
        if self.stacked:
            return stacked_scores(self.env.kind, output, target)
        return task_score(self.env.kind, output, target).reshape(1)

    def stationarity(self) -> Optional[torch.Tensor]:
        """‖∇g(φ_K)‖/‖∇g(φ_0)‖ of each task of the inner loop just run ([T]); None where the
        Lower problem does not measure it (unrolled MAML: no stationarity assumption)."""
        return None

    def adapted_norms(self) -> torch.Tensor:
        """‖φ_t‖ of each task being adapted, [T]."""
        if self.plan is None or self.plan.tasks is None:  # φ shaped as θ: one task
            return global_norm(self.trainable_parameters()).reshape(1)
        with torch.no_grad():
            return torch.stack([p.reshape(self.num_tasks, -1).norm(dim=1)
                                for p in self.trainable_parameters()]).norm(dim=0)

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
