"""Multi-layer perceptron on flattened pixels: the lectures' baseline before CNNs."""

from __future__ import annotations

from torch import nn

from cnnlab.models import blocks
from cnnlab.registry import MODELS
from cnnlab.validation import PositiveInt, Probability


@MODELS.register(family="mlp")
def mlp(
    *, in_channels: int, num_classes: int, input_size: int,
    hidden: list[PositiveInt] = [512, 256],  # noqa: B006  (read-only default, shown in `cnnlab list`)
    activation: blocks.Activation = "relu",
    dropout: Probability = 0.0,
    batch_norm: bool = False,
) -> nn.Sequential:
    """Flatten -> [Linear -> (BN) -> activation -> (dropout)] per hidden size -> Linear. `hidden=[64]` is the homework's MLP."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_channels * input_size * input_size
    for h in hidden:
        layers.append(nn.Linear(width, h, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm1d(h))
        layers.append(blocks.activation(activation))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
