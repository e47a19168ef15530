"""Building blocks shared by the model families."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from cnnlab.errors import CnnlabError

Activation = Literal["relu", "tanh", "sigmoid", "gelu", "leaky_relu"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "leaky_relu": nn.LeakyReLU,
}


def activation(name: str) -> nn.Module:
    return _ACTIVATIONS[name]()


def conv_bn_act(
    in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, *,
    batch_norm: bool = True, act: str | None = "relu",
) -> nn.Sequential:
    """conv (no bias when BN follows: BN's shift makes it redundant) -> BN -> activation."""
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_ch))
    if act is not None:
        layers.append(activation(act))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet's basic block with an identity shortcut: relu(x + BN(conv(relu(BN(conv(x))))))."""

    def __init__(self, channels: int, *, batch_norm: bool = True):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_act(channels, channels, batch_norm=batch_norm),
            conv_bn_act(channels, channels, batch_norm=batch_norm, act=None),
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.body(x))


def flat_features(features: nn.Module, in_channels: int, input_size: int, model: str) -> int:
    """Length of the flattened output of ``features`` for one input, found by running it once."""
    try:
        with torch.no_grad():
            out = features(torch.zeros(1, in_channels, input_size, input_size))
    except RuntimeError:  # a kernel larger than what is left of the image
        out = torch.zeros(0)
    if out.numel() == 0:
        raise CnnlabError(f"model {model!r} shrinks {input_size}x{input_size} inputs to nothing")
    return out.numel()
