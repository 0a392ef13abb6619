"""What every Lower problem shares, per-task or task-vectorized: its config and ``TaskAdaptation``.

A Lower problem adapts the T tasks of one inner loop: one at a time (T = 1, tensors as one task
has them) or, when the builder sets ``tasks_at_once = None``, a whole meta-batch stacked along
dim 0 (``stacked``: φ is [T, ...] per parameter, the model runs every task at once with its own
parameters through ``imaml.vectorize.TaskGroupedModel``, and the objective is the sum of the
per-task objectives, so each φ_t gets exactly its own task's gradient). That is how the same
class is run, not another class. Either way it reports per-task tensors of one shape, [T]:
``task_losses``, ``task_scores``, ``adapted_norms``, ``stationarity`` and, after a solve,
``hypergrad_infos`` (T of them), which is all the engine, the divergence guard and the records
read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, List, Optional, Sequence, Type, Union

import torch
from betty.configs import Config
from torch import nn

from imaml import betty_glue
from imaml.errors import UsageError
from imaml.metrics import global_norm, stacked_losses, stacked_scores, task_loss, task_score
from imaml.models import predict_query
from imaml.vectorize import TaskGroupedModel, stack_for_tasks
from problems.head import find_head, head_names
from problems.upper import MetaInit

__all__ = ["LowerConfig", "TaskAdaptation", "proximal", "head_start"]


def proximal(phi: Sequence[torch.Tensor], centre: Optional[Sequence[torch.Tensor]],
             lam: Union[float, Sequence[float]], tasks: Optional[int] = None) -> torch.Tensor:
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
    return list(theta_head) if tasks is None else [t.unsqueeze(0).expand(tasks, *t.shape) for t in theta_head]


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
    head_init: str = "theta"  # where the adapted head starts: θ's head, or zero (--head-init)
    test_lam: Optional[float] = None  # iMAML: λ at meta-validation and meta-test (None: lam)
    head_lam: Optional[float] = None  # iMAML, whole network: λ on the output layer (None: lam)


class TaskAdaptation:
    """What both Lower problems share: the data they read and how a task starts.

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
    # a class that always starts its head one way sets this ("theta" or "zero"); otherwise the
    # config's head_init (--head-init) decides
    fixed_head_init: ClassVar[Optional[str]] = None

    # tasks of a meta-batch one inner loop adapts: 1 (one at a time, unstacked), or None (the
    # whole meta-batch at once, stacked along dim 0), set on the instance by the builder
    tasks_at_once: Optional[int] = 1
    stackable: ClassVar[bool] = False
    num_tasks = 1  # T, the tasks of the current inner loop
    hypergrad_infos: Sequence = ()  # after a solve (iMAML): the solver's SolveInfo of each task

    @property
    def head_init(self) -> str:
        """Where each task's head starts: "theta" (θ's head) or "zero" (zeros, one row per class)."""
        return self.fixed_head_init or getattr(self.config, "head_init", "theta")

    def find_head_names(self) -> List[str]:
        """The output layer's parameter names; a zero-started head must be one ``nn.Linear``."""
        name, layer = find_head(self.module)
        if self.head_init == "zero" and not isinstance(layer, nn.Linear):
            raise UsageError(f"--head-init zero needs an output layer that is one nn.Linear; "
                             f"{type(self.module).__name__}.{name} is a {type(layer).__name__}")
        return head_names(self.module)

    def task_ways(self) -> int:
        """Outputs the current task(s) need: the number of classes (labels are 0..N−1, every
        class in the support set), or the model's output size for regression."""
        if self.env.kind == "classification":
            return int(self.env.current.support_y.max()) + 1
        return find_head(self.meta_problem.module)[1].out_features

    def zero_started_index(self) -> List[int]:
        """Positions (in ``module.named_parameters()``) of the head entries every task starts at
        zero; none for a θ-started head."""
        if self.head_init != "zero":
            return []
        head = set(self.find_head_names())
        return [i for i, (name, _) in enumerate(self.module.named_parameters()) if name in head]

    def zero_theta_head(self) -> None:
        """With a zero-started head, θ's head is a placeholder that never gets a meta-gradient:
        zero it once, so the saved θ says what every task starts from."""
        theta = list(self.meta_problem.module.parameters())
        with torch.no_grad():
            for i in self.zero_started_index():
                theta[i].zero_()

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

    def stacked_start(self, theta: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """φ₀ of every task, [T, ...] per parameter: θ's rows, with a zero-started head's
        entries at zeros sized to the tasks' ways."""
        zero = self.zero_started_index()
        ways = self.task_ways() if zero else 0
        stacked = stack_for_tasks(theta, self.num_tasks)
        return [head_start([t[0]], "zero", ways, len(t))[0] if i in zero else t for i, t in enumerate(stacked)]

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
        if not self.stacked:
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
