"""Which parameters are a model's output layer (the "head"), for ANIL and the zero-init head."""

from __future__ import annotations

from typing import Callable, List, Tuple

import torch
from torch import nn

from imaml.errors import UsageError

__all__ = ["find_head", "head_names", "head_input"]


def find_head(module: nn.Module) -> Tuple[str, nn.Module]:
    """(name, submodule) of the output layer: the submodule called ``head`` if the model has
    one (conv4 does), else its last ``nn.Linear`` (the MLP's output layer). A model of
    another shape names its output layer ``head``."""
    if isinstance(getattr(module, "head", None), nn.Module):
        return "head", module.head
    linears = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UsageError(f"model {type(module).__name__}: no output layer found (no submodule named "
                         f"'head' and no nn.Linear); name the output layer 'head'")
    return linears[-1]


def head_names(module: nn.Module) -> List[str]:
    """The output layer's parameter names, as ``module.named_parameters()`` spells them."""
    prefix = find_head(module)[0] + "."
    return [name for name, _ in module.named_parameters() if name.startswith(prefix)]


def head_input(layer: nn.Module, forward: Callable[[], object]) -> torch.Tensor:
    """What the output layer ``layer`` receives while ``forward()`` runs the model once: the
    encoder's features (the pretrain and ProtoNet baselines' prototypes are made of them)."""
    seen: List[torch.Tensor] = []
    hook = layer.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    try:
        forward()
    finally:
        hook.remove()
    return seen[0]
