"""Gradient checkpointing for one differentiable step of an unrolled inner loop."""

from __future__ import annotations

from typing import Any, Callable, List, Sequence, Tuple

import torch

__all__ = ["recompute_in_backward"]

Step = Callable[[Tuple[torch.Tensor, ...]], Tuple[Sequence[torch.Tensor], Any]]


def recompute_in_backward(step: Step, carried: Sequence[torch.Tensor], reads: Sequence[torch.Tensor] = ()) -> tuple:
    """``step(carried) -> (new_carried, aux)``, keeping only ``carried`` for the backward pass.

    The step runs once without keeping its graph; the backward pass runs it again with a
    graph and takes the vector-Jacobian product through it. For an unrolled inner loop of K
    steps that keeps K copies of the carried state (φ_k, momentum buffers) instead of K
    graphs of forward activations and gradients.

    Args:
        step: a deterministic function of ``carried`` and of the tensors in ``reads``; it must
            leave every other state as it found it (it runs again in the backward pass). The
            random number generators are restored for the second run, so dropout repeats.
        carried: what the step maps to the next step's input (φ_k and optimizer state); its
            gradient flows through the step to these tensors' own history.
        reads: tensors the step reads directly (not through ``carried``) and that need a
            gradient, e.g. meta-parameters such as Meta-SGD's learned rates; they are neither
            copied nor saved (they outlive the step anyway).

    Returns:
        (new_carried, aux): ``new_carried`` connected to ``carried`` and ``reads`` through the
        recomputation, and ``aux`` from the first run (no gradient).
    """
    box: List[Any] = []
    reads = [t for t in reads if t.requires_grad]
    new = _Recompute.apply(step, box, len(carried), *carried, *reads)
    return tuple(new), box[0]


def _differentiable(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _fresh(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(_differentiable(t))


class _Recompute(torch.autograd.Function):
    # torch.utils.checkpoint(use_reentrant=False) gives the same gradients but, with the
    # autograd.grad call inside the step, kept ~1.5x more memory in our measurements.

    @staticmethod
    def forward(ctx, step, box, n_carried, *tensors):
        carried, ctx.reads = tensors[:n_carried], tensors[n_carried:]
        ctx.step = step
        ctx.save_for_backward(*carried)
        ctx.devices = sorted({t.device.index for t in carried if t.device.type == "cuda"})
        ctx.rng = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in ctx.devices])
        with torch.enable_grad():
            new, aux = step(tuple(_fresh(t) for t in carried))
        box.append(aux)
        out = tuple(t.detach() for t in new)
        ctx.mark_non_differentiable(*(t for t in out if not _differentiable(t)))
        return out

    @staticmethod
    def backward(ctx, *grads):
        inputs = tuple(_fresh(t) for t in ctx.saved_tensors)
        with torch.random.fork_rng(devices=ctx.devices), torch.enable_grad():
            torch.set_rng_state(ctx.rng[0])
            for device, state in zip(ctx.devices, ctx.rng[1]):
                torch.cuda.set_rng_state(state, device)
            new, _ = ctx.step(inputs)
            pairs = [(out, g) for out, g in zip(new, grads) if g is not None and out.requires_grad]
            wrt = [t for t in (*inputs, *ctx.reads) if t.requires_grad]
            vjp = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
                       if pairs else [None] * len(wrt))
        return (None, None, None, *(next(vjp) if t.requires_grad else None for t in (*inputs, *ctx.reads)))
