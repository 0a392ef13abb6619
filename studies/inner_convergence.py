"""How close does each iMAML inner optimizer get to a stationary point of g, on real tasks?

For one meta-batch of a task's training tasks, at θ₀ (or at the θ of a checkpoint), runs each
``--inner-optimizer`` / λ / step budget given and reports per task the stationarity
‖∇g(φ_K)‖ / ‖∇g(θ)‖, the objective's first and last value, the objective evaluations of the
line searches, the seconds, and the extreme eigenvalues of A = ∂²g/∂φ² at φ_K (power
iteration), i.e. whether the implicit function theorem's assumptions hold there.

    python -m studies.inner_convergence --task omniglot --data-root data/omniglot-small1-sets \\
        --model conv4-strided --setting sgd:2:16:0.1 --setting armijo:2:50:1.0 --setting hessian-free:2:20:0.1

``--setting OPTIMIZER:LAMBDA:STEPS:LR``; the run's other settings come from the flags after
``--`` (as run.py takes them).
"""

from __future__ import annotations

import argparse
import time
from typing import List

import torch

from engines.build import build_engine
from imaml.app.arguments import parse_args
from imaml.inner_optimizers import rows
from imaml.solvers import largest_eigenvalue

__all__ = ["measure", "main"]


def _spectrum(lower) -> tuple:
    """(λ_min, λ_max) of A at the current φ, by power iteration on A and on λ_max·I − A."""
    batch, params = lower.get_batch(), list(lower.trainable_parameters())
    grad = rows(torch.autograd.grad(lower.training_step(batch), params, create_graph=True), lower.num_tasks)

    def matvec(u):
        return rows(torch.autograd.grad(grad, params, u, retain_graph=True), lower.num_tasks)

    top = float(largest_eigenvalue(matvec, grad.detach(), 30))
    shifted = float(largest_eigenvalue(lambda u: top * u - matvec(u), grad.detach(), 30))
    return top - shifted, top


def measure(run_flags: List[str], optimizer: str, lam: float, steps: int, lr: float, tasks: int,
            checkpoint: str = None) -> List[dict]:
    config = parse_args(run_flags + ["--algo", "imaml", "--execution", "per-task", "--meta-batch-size", str(tasks),
                                     "--inner-optimizer", optimizer, "--lam", str(lam), "--inner-steps", str(steps),
                                     "--inner-lr", str(lr), "--inner-tol", "0"]).validate()
    engine = build_engine(config)
    if checkpoint:
        state = torch.load(checkpoint, weights_only=False)
        engine.upper.load_state_dict(state["upper"])
    engine.env.step()
    lower = engine.lower
    lower.eval()
    engine.upper.eval()
    out = []
    for index in range(tasks):
        engine.env.select(index)
        lower.begin_task()
        start = time.perf_counter()
        for _ in range(steps):
            lower.step(global_step=0)
        seconds = time.perf_counter() - start
        low, high = _spectrum(lower)
        out.append({"optimizer": optimizer, "lam": lam, "steps": steps, "lr": lr, "task": index,
                    "stationarity": float(lower.stationarity()[0]), "objective_first": lower.inner_losses[0],
                    "objective_last": lower.inner_losses[-1], "trials": lower.inner.trials, "seconds": seconds,
                    "eig_min": low, "eig_max": high})
    return out


def main(argv=None) -> None:
    argv = list(argv) if argv is not None else None
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--setting", action="append", required=True, help="OPTIMIZER:LAMBDA:STEPS:LR")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--checkpoint", help="measure at this checkpoint's θ instead of θ₀")
    args, run_flags = parser.parse_known_args(argv)
    torch.set_num_threads(1)
    print("| optimizer | λ | steps | lr | stationarity per task | objective first → last (mean) "
          "| λ_min(A), λ_max(A) (mean) | line-search evaluations | s per task |")
    print("|---|---|---|---|---|---|---|---|---|")
    for setting in args.setting:
        name, lam, steps, lr = setting.split(":")
        rows_ = measure(run_flags, name, float(lam), int(steps), float(lr), args.tasks, args.checkpoint)
        n = len(rows_)
        mean = lambda key: sum(r[key] for r in rows_) / n  # noqa: E731
        per_task = ", ".join(f"{r['stationarity']:.3f}" for r in rows_)
        print(f"| {name} | {lam} | {steps} | {lr} | {per_task} "
              f"| {mean('objective_first'):.3f} → {mean('objective_last'):.3f} | {mean('eig_min'):.3g}, "
              f"{mean('eig_max'):.3g} | {mean('trials'):.0f} | {mean('seconds'):.1f} |", flush=True)


if __name__ == "__main__":
    main()
