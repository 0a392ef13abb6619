"""Unrolled inner steps: recomputed in the backward pass (``--grad-checkpoint``), and the
differentiable SGD update they take."""

from __future__ import annotations

import warnings
from typing import ClassVar, List, Sequence

import torch

from imaml import betty_glue
from imaml.recompute import recompute_in_backward

__all__ = ["RecomputedSteps", "differentiable_sgd"]


class RecomputedSteps:
    """With ``--grad-checkpoint``, each differentiable inner step keeps only its input for
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

    def step_reads(self) -> List[torch.Tensor]:
        """The tensors needing a gradient that a step reads besides ``self.params``: by default
        the meta-parameters (Meta-SGD's rates). The recomputed step differentiates into them and
        no further, so a class whose steps read θ only through tensors computed once per inner
        loop (the head's features) names those instead."""
        return list(self.meta_problem.trainable_parameters())

    def one_step_descent(self, batch=None):
        if not (self.settings.grad_checkpoint and self.in_training and betty_glue.differentiates_inner_steps(self)):
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
            step, carried, reads=self.step_reads())
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


def differentiable_sgd(params: Sequence[torch.Tensor], optimizer) -> tuple:
    """``torch.optim.SGD``'s update (weight decay, momentum, dampening, Nesterov) of the entries
    of ``params`` that have a ``.grad``, from differentiable ops; the others pass through.

    ``optimizer`` is Betty's patched inner optimizer (``param_groups``, each group's indices into
    ``params`` from ``betty_glue.parameter_indices``, a ``state`` dict per entry for the momentum
    buffer). Betty's own DifferentiableSGD computes 0·buf + 1·∇ at momentum 0 — two more products per parameter and
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
