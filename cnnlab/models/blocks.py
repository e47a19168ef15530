"""Building blocks shared by the model families."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.core.errors import CnnlabError

# The lectures' list: "Use ReLU. Try out Leaky ReLU / Maxout / ELU. Try out tanh but don't expect much.
# Don't use sigmoid." PReLU (He et al. 2015) and GELU besides; lecun_tanh for LeNet-era nets.
Activation = Literal["relu", "leaky_relu", "prelu", "elu", "gelu", "tanh", "lecun_tanh", "sigmoid", "maxout"]
Stem = Literal["auto", "small", "large"]  # small: 28x28 / 32x32 inputs (CIFAR stem); large: ImageNet-style

class LeCunTanh(nn.Module):
    """1.7159 tanh(2x/3) (LeCun et al., Efficient BackProp): near-unit gain, meant for lecun_normal init."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.7159 * torch.tanh(2 * x / 3)


class Maxout(nn.Module):
    """max over k linear pieces (Goodfellow et al. 2013): the layer before gives k x the channels, and
    output channel c is the largest of input channels c*k .. c*k + k - 1."""

    def __init__(self, pieces: int = 2):
        super().__init__()
        self.pieces = pieces

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(1, (x.shape[1] // self.pieces, self.pieces)).amax(2)


_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "prelu": nn.PReLU, "elu": nn.ELU, "gelu": nn.GELU,
    "tanh": nn.Tanh, "lecun_tanh": LeCunTanh, "sigmoid": nn.Sigmoid, "maxout": Maxout,
}


def activation(name: str) -> nn.Module:
    return _ACTIVATIONS[name]()


def activation_name(module: nn.Module) -> str | None:
    """The Activation that ``module`` is, or None."""
    return next((name for name, cls in _ACTIVATIONS.items() if type(module) is cls), None)


class FractionalMaxPool(nn.FractionalMaxPool2d):
    """Fractional max-pooling (Graham 2014): pooling regions of random sizes 1 or 2 that shrink a map by
    1/sqrt(2) instead of 1/2, so twice as many pooling layers fit. Random regions per image while
    training; evaluation uses fixed, evenly spread ones, so it is deterministic."""

    def __init__(self):
        super().__init__(kernel_size=2, output_ratio=2 ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        fixed = torch.full((x.shape[0], x.shape[1], 2), 0.5, dtype=x.dtype, device=x.device)
        return F.fractional_max_pool2d(x, 2, output_ratio=self.output_ratio, _random_samples=fixed)


def pool2x2(fractional: bool, ceil_mode: bool = False) -> nn.Module:
    """A 2x2/2 max-pool, or fractional max-pooling in its place."""
    return FractionalMaxPool() if fractional else nn.MaxPool2d(2, 2, ceil_mode=ceil_mode)


class DropConnectLinear(nn.Linear):
    """A fully connected layer whose weights, not its outputs, are dropped with probability p while
    training (Wan et al. 2013), one mask per batch; kept weights are scaled by 1 / (1 - p), so
    evaluation uses the weights as they are."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, p: float = 0.5):
        super().__init__(in_features, out_features, bias)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return F.linear(x, self.weight, self.bias)
        keep = torch.empty_like(self.weight).bernoulli_(1 - self.p)
        return F.linear(x, self.weight * keep / (1 - self.p), self.bias)


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


def conv_like(conv: nn.Conv2d, *, in_channels: int | None = None, out_channels: int | None = None) -> nn.Conv2d:
    """A fresh conv with ``conv``'s geometry (kernel, stride, padding, dilation, groups, bias) and other channel counts."""
    return nn.Conv2d(in_channels or conv.in_channels, out_channels or conv.out_channels, conv.kernel_size, conv.stride,
                     conv.padding, conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)


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
