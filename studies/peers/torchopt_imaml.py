"""TorchOpt 0.7.3's implicit iMAML, as a peer row of ``studies.compare`` (``torchopt-imaml``).

    bash studies/peers/setup_torchopt.sh          # once: .venv-peers (TorchOpt is no requirement here)
    .venv-peers/bin/python -m studies.peers.torchopt_imaml --task omniglot --data-root DIR --seed 0 \\
        --lam 2 --inner-steps 5 --inner-lr 0.1 --cg-steps 5 --output-dir runs/torchopt

Takes run.py's flags and reads the paper's iMAML preset (``configs/<task>-imaml.yaml``), on
run.py's tasks and network (``studies/peers/common.py``). The algorithm is that of TorchOpt's
Omniglot example (``examples/iMAML/imaml_omniglot_functional.py``): the whole network is adapted
from a detached copy of θ by ``--inner-steps`` steps of ``torchopt.sgd(lr=--inner-lr)`` on the
proximal objective g(φ, θ) = L_support(φ) + λ/2·‖φ − θ‖² (λ = ``--lam``), and that inner solver
is decorated with ``torchopt.diff.implicit.custom_root`` over the stationarity condition
∇φ g(φ, θ) = 0, its linear system solved by ``torchopt.linear_solve.solve_normal_cg(maxiter=
--cg-steps, rtol=--cg-tol, atol=0)``. The meta-batch's mean query loss is backpropagated once per
meta-batch. Meta-validation and meta-test: the same SGD steps (``--test-inner-steps``, λ =
``--test-lam`` where set) without the implicit gradient.

Not read (TorchOpt's algorithm has no such setting): ``--hypergrad`` (always normal CG),
``--cg-trust-region``, ``--cg-damping``, ``--inner-tol`` (every inner loop runs all its steps).
"""

from __future__ import annotations

import sys
import warnings
from typing import Callable, Sequence, Tuple

import torch
from torch.func import functional_call

from studies.peers.common import Peer, PeerSetup, main
from imaml.errors import UsageError
from imaml.metrics import task_loss, task_score
from imaml.models import predict_query

__all__ = ["TorchOptIMAML", "import_torchopt", "implicit_inner_solver", "proximal_sgd"]

Params = Tuple[torch.Tensor, ...]


def import_torchopt():
    """``import torchopt`` (its functorch deprecation notices silenced), or a UsageError naming the venv."""
    # TorchOpt 0.7.3 calls functorch.vjp, deprecated since torch 2.0, in every backward
    warnings.filterwarnings("ignore", message=r"We've integrated functorch", category=FutureWarning)
    try:
        import torchopt
    except ImportError:
        raise UsageError("torchopt is not installed in this environment; it has a venv of its own: "
                         "bash studies/peers/setup_torchopt.sh, then run .venv-peers/bin/python -m "
                         "studies.peers.torchopt_imaml") from None
    return torchopt


def proximal_objective(forward: Callable, kind: str, lam: float) -> Callable:
    """g(φ, θ; x, y) = L(f_φ(x), y) + λ/2·‖φ − θ‖², φ and θ as tuples of tensors."""

    def objective(params: Params, meta_params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = task_loss(kind, forward(params, x), y)
        return loss + sum(0.5 * lam * torch.sum(torch.square(p - t)) for p, t in zip(params, meta_params))

    return objective


def proximal_sgd(torchopt, objective: Callable, params: Params, meta_params: Params, x, y, lr: float,
                 steps: int) -> Params:
    """``steps`` steps of ``torchopt.sgd(lr)`` on ``objective`` from ``params`` (updated in place)."""
    optimizer = torchopt.sgd(lr=lr)
    state = optimizer.init(params)
    with torch.enable_grad():  # custom_root runs the solver inside an autograd Function
        for _ in range(steps):
            grads = torch.autograd.grad(objective(params, meta_params, x, y), params)
            updates, state = optimizer.update(grads, state, inplace=True)
            params = torchopt.apply_updates(params, updates, inplace=True)
    return params


def implicit_inner_solver(torchopt, forward: Callable, kind: str, lam: float, lr: float, steps: int,
                          cg_steps: int, cg_tol: float) -> Callable:
    """``solve(φ₀, θ, x, y) -> φ``: proximal SGD whose derivative in θ is the implicit one, by
    TorchOpt's ``custom_root`` over ∇φ g = 0 and ``solve_normal_cg``."""
    objective = proximal_objective(forward, kind, lam)

    @torchopt.diff.implicit.custom_root(
        torch.func.grad(objective, argnums=0), argnums=1,
        solve=torchopt.linear_solve.solve_normal_cg(maxiter=cg_steps, rtol=cg_tol, atol=0.0))
    def solve(params: Params, meta_params: Params, x: torch.Tensor, y: torch.Tensor) -> Params:
        return proximal_sgd(torchopt, objective, params, meta_params, x, y, lr, steps)

    return solve


class TorchOptIMAML(Peer):
    """TorchOpt's implicit iMAML over run.py's θ."""

    library = "torchopt"
    algo = "imaml"
    not_read = ("hypergrad", "cg_trust_region", "cg_damping", "inner_tol")

    @classmethod
    def check(cls, config) -> None:
        if config.inner_optimizer != "sgd":
            raise UsageError(f"--inner-optimizer {config.inner_optimizer}: TorchOpt's iMAML example adapts by "
                             f"plain SGD; use --inner-optimizer sgd")

    def __init__(self, setup: PeerSetup):
        super().__init__(setup)
        self.torchopt = import_torchopt()
        self.library = f"torchopt {self.torchopt.__version__}"
        model, cfg = setup.model, self.config
        names = [name for name, _ in model.named_parameters()]
        self.theta: Params = tuple(model.parameters())

        def forward(params: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return functional_call(model, dict(zip(names, params)), (x,))

        self.forward = forward
        self.solve = implicit_inner_solver(self.torchopt, forward, setup.kind, cfg.lam, cfg.inner_lr, cfg.inner_steps,
                                           cfg.cg_steps, cfg.cg_tol)

    def start(self) -> Params:
        """φ₀: a detached copy of θ (TorchOpt's example clones it per task)."""
        return tuple(t.detach().clone().requires_grad_() for t in self.theta)

    def query_output(self, params: Params, task) -> torch.Tensor:
        return predict_query(lambda x: self.forward(params, x), self.setup.model, task.support_x, task.query_x)

    def meta_gradient(self, batch) -> Tuple[float, float]:
        kind, losses, scores = self.setup.kind, [], []
        for i in range(batch.num_tasks):
            task = batch.task(i)
            phi = self.solve(self.start(), self.theta, task.support_x, task.support_y)
            output = self.query_output(phi, task)
            losses.append(task_loss(kind, output, task.query_y))
            scores.append(task_score(kind, output.detach(), task.query_y).item())
        loss = torch.stack(losses).mean()
        loss.backward()  # one backward per meta-batch, as the example takes its meta-gradient
        return loss.item(), sum(scores) / len(scores)

    def predict(self, task) -> torch.Tensor:
        cfg = self.config
        lam = cfg.lam if cfg.test_lam is None else cfg.test_lam
        objective = proximal_objective(self.forward, self.setup.kind, lam)
        theta = tuple(t.detach() for t in self.theta)
        phi = proximal_sgd(self.torchopt, objective, self.start(), theta, task.support_x, task.support_y,
                           cfg.inner_lr, cfg.test_inner_steps)
        with torch.no_grad():
            return self.query_output(phi, task)

    def protocol(self) -> dict:
        return {"hypergrad": "torchopt.linear_solve.solve_normal_cg"}


if __name__ == "__main__":
    sys.exit(main(TorchOptIMAML))
