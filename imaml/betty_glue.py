"""Every place this project reaches into Betty's internals, in one file.

Written against betty-ml 0.1.1 (``betty/problems/problem.py``, ``betty/problems/
iterative_problem.py``, ``betty/optim/``, ``betty/hypergradient/__init__.py``). Betty has no
public API for these; each function names the attribute it touches and why we need it, so the
day a newer Betty installs, this file is the list of what to check. Nothing else in the project
names a private Betty attribute (``tests/test_layout.py`` checks it).
"""

from __future__ import annotations

from typing import Callable, Dict

from betty import hypergradient

__all__ = ["is_training", "restart_inner_loop", "set_first_order", "differentiates_inner_steps",
           "tasks_per_meta_update", "remember_batch", "last_batch", "objective", "parameter_indices",
           "install_solver", "solver_table", "BETTY_SOLVERS"]

# The hypergradient table as betty-ml 0.1.1 ships it; our solvers never take these keys.
BETTY_SOLVERS = ("darts", "neumann", "cg", "reinforce")


def is_training(problem) -> bool:
    """Whether ``problem`` is in train mode. Betty 0.1.1 keeps it in ``problem._training``
    (set by its ``train()``/``eval()``) and has no public reader; in eval mode Betty never hands
    over to the Upper problem, so our inner steps skip the graph a meta-gradient would need."""
    return problem._training


def restart_inner_loop(problem) -> None:
    """Make the next ``step()`` call ``on_inner_loop_start`` (reset φ to θ). Betty 0.1.1 re-arms
    ``problem._inner_loop_start`` only after a training inner loop hands over to its parent;
    evaluation and a fresh task need it set by hand."""
    problem._inner_loop_start = True


def set_first_order(problem, first_order: bool) -> None:
    """Betty 0.1.1 derives ``problem._first_order`` (whether an inner step's gradient is
    differentiated) from the *parent's* config in ``initialize``; first-order MAML needs it from
    the Lower problem's own config."""
    problem._first_order = first_order


def differentiates_inner_steps(problem) -> bool:
    """The inverse of Betty 0.1.1's ``problem._first_order``: an unrolled step builds a graph."""
    return not problem._first_order


def tasks_per_meta_update(upper) -> int:
    """The tasks Betty averages into one meta-update: ``upper.gas``, Betty 0.1.1's name for
    ``Config.gradient_accumulation`` (it divides each task's loss by it)."""
    return upper.gas


def remember_batch(problem, batch) -> None:
    """Betty 0.1.1's hypergradient functions re-evaluate the Lower objective on
    ``problem.cur_batch``; an inner step that bypasses Betty's ``one_step_descent`` sets it."""
    problem.cur_batch = batch


def last_batch(problem):
    """The batch of the last inner step (``problem.cur_batch`` in Betty 0.1.1)."""
    return problem.cur_batch


def objective(problem, batch):
    """``problem.training_step_exec(batch)``: Betty 0.1.1's wrapper of ``training_step`` (mixed
    precision), what its own steps and hypergradients evaluate; ours evaluate the same."""
    return problem.training_step_exec(batch)


def parameter_indices(optimizer) -> list:
    """For each param group of Betty's patched (differentiable) optimizer, the indices of its
    entries in the problem's ``params`` tuple (``optimizer.param_mappings`` in Betty 0.1.1)."""
    return optimizer.param_mappings


def install_solver(key: str, fn: Callable) -> str:
    """Put a hypergradient function in Betty 0.1.1's dispatch table
    (``betty.hypergradient.jvp_fn_mapping``, read by a problem's ``config.type``), under a key
    of our own: Betty's own entries stay as Betty ships them, for anyone else in the process."""
    if key in BETTY_SOLVERS:
        raise ValueError(f"{key!r} is Betty's own solver name; register ours under another")
    hypergradient.jvp_fn_mapping[key] = fn
    return key


def solver_table() -> Dict[str, Callable]:
    """A copy of Betty's hypergradient dispatch table (for checks that we leave it alone)."""
    return dict(hypergradient.jvp_fn_mapping)
