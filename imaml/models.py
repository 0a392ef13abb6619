"""Backbones of the MAML/iMAML papers, sized from the task."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from imaml.errors import UsageError

__all__ = ["Conv4", "MLP", "build_model", "MODELS"]


class Conv4(nn.Module):
    """Four blocks of 3×3 conv → BatchNorm → ReLU → 2×2 max-pool, then a linear head
    (Finn et al., 2017; 64 filters for Omniglot-sized inputs).

    BatchNorm keeps no running statistics: it normalizes with the statistics of the batch
    it sees (the support set while adapting, the query set when predicting), which is the
    transductive protocol of the MAML paper.
    """

    def __init__(self, in_channels: int, num_outputs: int, channels: int = 64, image_size: int = 28):
        super().__init__()
        blocks = []
        for i in range(4):
            blocks += [
                nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1),
                nn.BatchNorm2d(channels, track_running_stats=False),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
        self.features = nn.Sequential(*blocks, nn.Flatten())
        side = image_size
        for _ in range(4):
            side //= 2
        self.head = nn.Linear(channels * max(side, 1) ** 2, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MLP(nn.Module):
    """The sinusoid regressor of the MAML paper: two hidden ReLU layers of 40 units."""

    def __init__(self, in_features: int = 1, num_outputs: int = 1, hidden: Sequence[int] = (40, 40)):
        super().__init__()
        layers, width = [], in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


MODELS = ("conv4", "mlp")


def build_model(name: str | None, input_shape: tuple, num_outputs: int, channels: int = 64) -> nn.Module:
    """The named backbone for inputs of ``input_shape``; ``None`` picks the task's default."""
    if name is None:
        name = "conv4" if len(input_shape) == 3 else "mlp"
    if name == "conv4":
        if len(input_shape) != 3:
            raise UsageError(f"--model conv4 needs image inputs; this task's inputs have shape {input_shape}")
        return Conv4(input_shape[0], num_outputs, channels=channels, image_size=input_shape[-1])
    if name == "mlp":
        if len(input_shape) != 1:
            raise UsageError(f"--model mlp needs vector inputs; this task's inputs have shape {input_shape}")
        return MLP(input_shape[0], num_outputs)
    raise UsageError(f"--model {name}: unknown model; choose one of {', '.join(MODELS)}")
