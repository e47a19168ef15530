"""Multi-layer perceptrons: the lectures' baseline before CNNs, and the coordinate MLP
with a Fourier-feature front end (Tancik et al. 2020)."""

from __future__ import annotations

import math

import torch
from torch import nn

from cnnlab.models import blocks
from cnnlab.core.registry import MODELS
from cnnlab.core.validation import PositiveFloat, PositiveInt, Probability
from cnnlab.models.shared import use_activation


def hidden_layers(width: int, hidden: list[int], dropout: float, batch_norm: bool) -> tuple[list[nn.Module], int]:
    """[Linear -> (BN) -> ReLU -> (dropout)] per hidden size; returns the layers and the last width.
    The builders then swap in their activation (shared.use_activation: maxout widens each Linear)."""
    layers: list[nn.Module] = []
    for h in hidden:
        layers.append(nn.Linear(width, h, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm1d(h))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    return layers, width


@MODELS.register(family="mlp")
def mlp(
    *, in_channels: int, num_classes: int, input_size: int,
    hidden: list[PositiveInt] = [512, 256],  # noqa: B006  (read-only default, shown in `cnnlab list`)
    activation: blocks.Activation = "relu",
    dropout: Probability = 0.0,
    batch_norm: bool = False,
) -> nn.Sequential:
    """Flatten -> [Linear -> (BN) -> activation -> (dropout)] per hidden size -> Linear. `hidden=[64]` is the homework's MLP."""
    layers, width = hidden_layers(in_channels * input_size * input_size, hidden, dropout, batch_norm)
    return use_activation(nn.Sequential(nn.Flatten(), *layers, nn.Linear(width, num_classes)), activation)


class FourierFeatures(nn.Module):
    """gamma(v) = [sin(2 pi B v), cos(2 pi B v)] with B ~ N(0, sigma^2), drawn once and kept fixed."""

    def __init__(self, in_features: int, num_frequencies: int, sigma: float):
        super().__init__()
        self.register_buffer("B", torch.randn(num_frequencies, in_features) * sigma)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        projected = 2 * math.pi * v @ self.B.T
        return torch.cat([torch.sin(projected), torch.cos(projected)], dim=-1)


@MODELS.register(family="mlp")
def fourier_mlp(
    *, in_channels: int, num_classes: int, input_size: int,
    num_frequencies: PositiveInt = 256, sigma: PositiveFloat = 10.0,
    hidden: list[PositiveInt] = [256, 256, 256],  # noqa: B006
    activation: blocks.Activation = "relu",
    dropout: Probability = 0.0,
    batch_norm: bool = False,
) -> nn.Sequential:
    """MLP on Fourier features of its input, for coordinates: (x, y) -> gamma -> hidden layers -> outputs."""
    features = FourierFeatures(in_channels * input_size * input_size, num_frequencies, sigma)
    layers, width = hidden_layers(2 * num_frequencies, hidden, dropout, batch_norm)
    return use_activation(nn.Sequential(nn.Flatten(), features, *layers, nn.Linear(width, num_classes)), activation)
