"""Backbones of the MAML/iMAML papers, sized from the task."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from imaml.choices import BN_MODES, MODELS
from imaml.errors import UsageError

__all__ = ["Conv4", "ResNet12", "MLP", "build_model", "MODELS", "BN_MODES", "norm2d", "predict_query",
           "EpisodicBatchNorm2d", "scratch_buffers"]


class EpisodicBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose statistics come from the first ``reference_rows`` examples of the
    batch (the support set) and are applied to all of it (support and queries); without a
    reference it uses the whole batch. Gradients flow through the reference statistics."""

    def __init__(self, channels: int):
        super().__init__(channels, track_running_stats=False)
        self.reference_rows: Optional[int] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reference_rows is None:
            return super().forward(x)
        reference = x[: self.reference_rows]
        mean = reference.mean(dim=(0, 2, 3), keepdim=True)
        var = reference.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def norm2d(channels: int, bn_mode: str) -> nn.Module:
    """The BatchNorm layer of ``bn_mode``:

    - transductive: batch statistics always (meta-train and meta-test), no running
      statistics; a query's prediction depends on the other queries (the MAML paper).
    - inductive: batch statistics while meta-training, which also update running
      statistics; those are used at meta-validation and meta-test (never updated there), so
      each query is predicted on its own.
    - episodic: the support set's statistics, also applied to the queries.
    """
    if bn_mode == "transductive":
        return nn.BatchNorm2d(channels, track_running_stats=False)
    if bn_mode == "inductive":
        return nn.BatchNorm2d(channels)
    if bn_mode == "episodic":
        return EpisodicBatchNorm2d(channels)
    raise UsageError(f"--bn-mode {bn_mode}: unknown; choose one of {', '.join(BN_MODES)}")


@contextmanager
def support_statistics(model: nn.Module, rows: int):
    """Within this block, episodic BatchNorm layers take statistics from the first ``rows``."""
    layers = [m for m in model.modules() if isinstance(m, EpisodicBatchNorm2d)]
    for layer in layers:
        layer.reference_rows = rows
    try:
        yield
    finally:
        for layer in layers:
            layer.reference_rows = None


@contextmanager
def scratch_buffers(module):
    """Forward passes inside see the buffers as they are but update scratch copies (swapped in,
    not copied back: a graph may keep them), so BatchNorm's running statistics stay as the inner
    loop left them: a re-evaluation is not another step."""
    modules = module.modules() if isinstance(module, torch.nn.Module) else ()
    slots = [(m, name) for m in modules for name, _ in m.named_buffers(recurse=False)]
    kept = [getattr(m, name) for m, name in slots]
    for (m, name), b in zip(slots, kept):
        setattr(m, name, b.clone())
    try:
        yield
    finally:
        for (m, name), b in zip(slots, kept):
            setattr(m, name, b)


def predict_query(forward: Callable, model: nn.Module, support_x: torch.Tensor,
                  query_x: torch.Tensor) -> torch.Tensor:
    """The adapted model's query predictions, ``forward`` being its forward function.

    With episodic BatchNorm the support set travels along to supply the statistics;
    otherwise the queries go alone."""
    if any(isinstance(m, EpisodicBatchNorm2d) for m in model.modules()):
        rows = support_x.shape[0]
        with support_statistics(model, rows):
            return forward(torch.cat([support_x, query_x]))[rows:]
    return forward(query_x)


ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU}


def activation_layer(name: str) -> nn.Module:
    """``relu`` (the papers' networks) or ``silu``: smooth, so the inner objective has the
    continuous Hessian the implicit function theorem needs (docs/meta-gradients.md)."""
    if name not in ACTIVATIONS:
        raise UsageError(f"--activation {name}: unknown; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class Conv4(nn.Module):
    """Four blocks of 3×3 conv → BatchNorm → ReLU (or ``activation``) → downsampling, then a linear head
    (Finn et al., 2017). ``pool="max"``: 2×2 max-pooling and the flattened feature map
    (their mini-ImageNet network, 32 filters); ``pool="stride"``: stride-2 convolutions and
    the spatial mean (their Omniglot network, 64 filters)."""

    def __init__(self, in_channels: int, num_outputs: int, channels: int = 64, image_size: int = 28,
                 bn_mode: str = "transductive", pool: str = "max", activation: str = "relu"):
        super().__init__()
        blocks = []
        for i in range(4):
            conv_in = in_channels if i == 0 else channels
            if pool == "max":
                blocks += [nn.Conv2d(conv_in, channels, 3, padding=1), norm2d(channels, bn_mode),
                           activation_layer(activation), nn.MaxPool2d(2)]
            else:
                blocks += [nn.Conv2d(conv_in, channels, 3, stride=2, padding=1), norm2d(channels, bn_mode),
                           activation_layer(activation)]
        if pool == "max":
            side = image_size
            for _ in range(4):
                side //= 2
            features = channels * max(side, 1) ** 2
            blocks.append(nn.Flatten())
        else:
            features = channels
            blocks += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(features, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ResidualBlock(nn.Module):
    """ResNet-12's block: three 3×3 conv-BN layers with leaky ReLUs, a 1×1 conv-BN shortcut,
    then 2×2 max-pooling (Oreshkin et al., 2018; Lee et al., 2019)."""

    def __init__(self, in_channels: int, channels: int, bn_mode: str):
        super().__init__()
        layers = []
        for i in range(3):
            layers += [nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1, bias=False),
                       norm2d(channels, bn_mode)]
            if i < 2:
                layers.append(nn.LeakyReLU(0.1))
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, bias=False), norm2d(channels, bn_mode))
        self.out = nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x) + self.shortcut(x))


class ResNet12(nn.Module):
    """ResNet-12 with widths (c, 2.5c, 5c, 10c) — (64, 160, 320, 640) for ``channels=64`` —
    global average pooling and a linear head."""

    def __init__(self, in_channels: int, num_outputs: int, channels: int = 64, bn_mode: str = "transductive"):
        super().__init__()
        widths = [channels, int(2.5 * channels), 5 * channels, 10 * channels]
        blocks, width = [], in_channels
        for w in widths:
            blocks.append(ResidualBlock(width, w, bn_mode))
            width = w
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MLP(nn.Module):
    """The sinusoid regressor of the MAML paper: two hidden ReLU (or ``activation``) layers of 40 units."""

    def __init__(self, in_features: int = 1, num_outputs: int = 1, hidden: Sequence[int] = (40, 40),
                 activation: str = "relu"):
        super().__init__()
        layers, width = [], in_features
        for h in hidden:
            layers += [nn.Linear(width, h), activation_layer(activation)]
            width = h
        layers.append(nn.Linear(width, num_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_model(name: str | None, input_shape: tuple, num_outputs: int, channels: int = 64,
                bn_mode: str = "transductive", activation: str = "relu") -> nn.Module:
    """The named backbone for inputs of ``input_shape``; ``None`` picks the task's default."""
    if name is None:
        name = "conv4" if len(input_shape) == 3 else "mlp"
    activation_layer(activation)  # an unknown name fails here, for every model
    if name == "resnet12" and activation != "relu":
        raise UsageError(f"--activation {activation}: resnet12 keeps its leaky ReLUs; "
                         "use --model conv4, conv4-strided or mlp")
    if name in ("conv4", "conv4-strided", "resnet12"):
        if len(input_shape) != 3:
            raise UsageError(f"--model {name} needs image inputs; this task's inputs have shape {input_shape}")
        if name == "resnet12":
            return ResNet12(input_shape[0], num_outputs, channels=channels, bn_mode=bn_mode)
        return Conv4(input_shape[0], num_outputs, channels=channels, image_size=input_shape[-1],
                     bn_mode=bn_mode, pool="max" if name == "conv4" else "stride", activation=activation)
    if name == "mlp":
        if len(input_shape) != 1:
            raise UsageError(f"--model mlp needs vector inputs; this task's inputs have shape {input_shape}")
        return MLP(input_shape[0], num_outputs, activation=activation)
    raise UsageError(f"--model {name}: unknown model; choose one of {', '.join(MODELS)}")
