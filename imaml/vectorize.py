"""Run one model on T tasks at once, each with its own parameters: a task-vectorized forward.

The meta-batch's tasks are independent, so their inner loops can run as one computation
whose parameters carry a leading task dimension ([T, ...], task t's copy of φ in row t).
``TaskGroupedModel`` does that for the backbones here without ``torch.func.vmap``: it keeps
activations as [B, T·C, ...] (task-major channels) and runs

- every convolution as one grouped convolution (``groups = T``),
- every BatchNorm (batch statistics, no running statistics) as one BatchNorm over T·C
  channels, which normalizes each task's channels with that task's own batch statistics,
- every linear layer as one batched matrix product,
- ReLU, SiLU, max-pooling and flattening unchanged (they act per channel or per element).

So task t sees exactly the computation it would see alone, up to floating-point summation
order. ``vmap`` over ``functional_call`` computes the same, but decomposes BatchNorm into
many small operations; the grouped form was 1.2-1.5x faster on CPU (see docs/performance.md).

Only models built from the layers above, inside containers whose forward just chains their
children (``nn.Sequential``, ``Conv4``, ``MLP``), qualify; ``why_not_vectorizable`` says why
another model does not, and the per-task path serves it.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from imaml.models import MLP, Conv4

__all__ = ["TaskGroupedModel", "stack_for_tasks", "why_not_vectorizable"]

# containers whose forward only chains their children (so the task-major layout survives)
_CHAINS = (nn.Sequential, Conv4, MLP)
# layers that act per element or per channel: correct on [B, T·C, ...] as they are
_PER_CHANNEL = (nn.ReLU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Tanh, nn.Sigmoid, nn.MaxPool2d, nn.AvgPool2d,
                nn.Identity)


def why_not_vectorizable(model: nn.Module) -> Optional[str]:
    """None if ``TaskGroupedModel`` can run ``model`` task-vectorized; otherwise the reason."""
    if next(model.buffers(), None) is not None:
        return "it has buffers (e.g. BatchNorm running statistics), which tasks would share"
    for name, module in model.named_modules():
        label = name or type(model).__name__
        if isinstance(module, _CHAINS) or isinstance(module, _PER_CHANNEL):
            continue
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros":
                return f"{label}: padding_mode {module.padding_mode!r}"
            continue
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if module.track_running_stats:
                return f"{label}: BatchNorm with running statistics"
            continue
        if isinstance(module, nn.Linear):
            continue
        if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
            continue
        return f"{label}: no task-vectorized form for {type(module).__name__}"
    return None


class _GroupedConv2d(nn.Module):
    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # weight [T, C_out, C_in/g, k, k]
        tasks = self.weight.shape[0]
        bias = None if self.bias is None else self.bias.reshape(-1)
        return F.conv2d(x, self.weight.reshape(-1, *self.weight.shape[2:]), bias, self.stride,
                        self.padding, self.dilation, self.groups * tasks)


class _GroupedBatchNorm(nn.Module):
    def __init__(self, norm: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # weight [T, C]: batch statistics per task
        weight = None if self.weight is None else self.weight.reshape(-1)
        bias = None if self.bias is None else self.bias.reshape(-1)
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)


class _GroupedLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T·F], weight [T, out, F]
        tasks, outputs, features = self.weight.shape
        per_task = x.reshape(x.shape[0], tasks, features).transpose(0, 1)  # [T, B, F]
        weight = self.weight.transpose(1, 2)
        out = torch.bmm(per_task, weight) if self.bias is None else torch.baddbmm(self.bias.unsqueeze(1), per_task, weight)
        return out.transpose(0, 1).reshape(x.shape[0], tasks * outputs)


def _grouped_twin(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with each parameterized layer replaced by its grouped form
    (same parameter names, so a state of stacked parameters plugs in with ``functional_call``)."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d):
            setattr(module, name, _GroupedConv2d(child))
        elif isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            setattr(module, name, _GroupedBatchNorm(child))
        elif isinstance(child, nn.Linear):
            setattr(module, name, _GroupedLinear(child))
        else:
            _grouped_twin(child)
    return module


class TaskGroupedModel:
    """``model`` evaluated on T tasks at once: ``self(params, x)`` with ``params`` shaped like
    ``model.parameters()`` plus a leading task dimension and ``x`` [T, B, *input] returns
    [T, B, outputs]. ``model`` itself is not modified (its parameters are only templates)."""

    def __init__(self, model: nn.Module):
        reason = why_not_vectorizable(model)
        if reason is not None:
            raise ValueError(f"cannot task-vectorize {type(model).__name__}: {reason}")
        self.names = [name for name, _ in model.named_parameters()]
        self.twin = _grouped_twin(copy.deepcopy(model))

    def __call__(self, params: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        tasks, batch = x.shape[:2]
        # [T, B, C, ...] -> [B, T·C, ...]: each task's channels side by side
        grouped = x.transpose(0, 1).reshape(batch, tasks * x.shape[2], *x.shape[3:])
        out = functional_call(self.twin, dict(zip(self.names, params)), (grouped,))
        return out.reshape(batch, tasks, -1).transpose(0, 1)


def stack_for_tasks(tensors: Sequence[torch.Tensor], tasks: int) -> list:
    """[T, ...] copies of each tensor (views: expand), for task-stacked computations."""
    return [t.unsqueeze(0).expand(tasks, *t.shape) for t in tensors]
