"""Building blocks shared by the model families."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import nn

from cnnlab.core.errors import CnnlabError

Activation = Literal["relu", "tanh", "lecun_tanh", "sigmoid", "gelu", "leaky_relu"]
Stem = Literal["auto", "small", "large"]  # small: 28x28 / 32x32 inputs (CIFAR stem); large: ImageNet-style

class LeCunTanh(nn.Module):
    """1.7159 tanh(2x/3) (LeCun et al., Efficient BackProp): near-unit gain, meant for lecun_normal init."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.7159 * torch.tanh(2 * x / 3)


_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "lecun_tanh": LeCunTanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU,
}


def activation(name: str) -> nn.Module:
    return _ACTIVATIONS[name]()


def resolve_stem(stem: str, input_size: int) -> str:
    """'auto' picks the small-image stem for inputs up to 64x64, the original stem above."""
    if stem != "auto":
        return stem
    return "small" if input_size <= 64 else "large"


# Normalisation layers: no weight decay for them (optimizer.no_decay_norm_bias); in transfer
# learning each belongs to the stage before it.
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def norm2d(channels: int, batch_norm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()


def conv_bn_act(
    in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, *,
    batch_norm: bool = True, act: str | None = "relu", groups: int = 1, padding: int | None = None,
) -> nn.Sequential:
    """conv (no bias when BN follows: BN's shift makes it redundant) -> BN -> activation."""
    pad = kernel // 2 if padding is None else padding
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel, stride, pad, groups=groups, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_ch))
    if act is not None:
        layers.append(activation(act))
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): x * sigmoid(W2 relu(W1 avgpool(x))), a gate per channel."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, 1)  # a 1x1 conv on a 1x1 map is a linear layer
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(self.pool(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class WithAux(NamedTuple):
    """Training-mode output of a model with auxiliary classifiers (GoogLeNet)."""

    logits: torch.Tensor
    aux: list[torch.Tensor]
    aux_weight: float  # loss = CE(logits) + aux_weight * sum(CE(aux))


def classifier_input(features: nn.Module, in_channels: int, input_size: int, model: str) -> tuple[int, ...]:
    """Shape (C, H, W) of ``features``' output for one input, found by running it once."""
    try:
        with torch.no_grad():
            out = features(torch.zeros(1, in_channels, input_size, input_size))
    except RuntimeError:  # a kernel larger than what is left of the image
        out = torch.zeros(0)
    if out.numel() == 0:
        raise CnnlabError(f"model {model!r} shrinks {input_size}x{input_size} inputs to nothing")
    return tuple(out.shape[1:])


def flat_features(features: nn.Module, in_channels: int, input_size: int, model: str) -> int:
    """Length of the flattened output of ``features`` for one input."""
    n = 1
    for d in classifier_input(features, in_channels, input_size, model):
        n *= d
    return n
