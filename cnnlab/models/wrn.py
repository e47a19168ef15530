"""Wide residual networks (Zagoruyko & Komodakis 2016): WRN-d-k.

Pre-activation basic blocks in 3 stages of widths 16k, 32k, 64k, (d - 4) / 6 blocks
each, after a 3x3 conv of 16 channels; dropout between a block's two convs.
"""

from __future__ import annotations

from cnnlab.core.errors import CnnlabError
from cnnlab.models.resnet import PreActBasicBlock, ResNet, use_stochastic_depth
from cnnlab.core.registry import MODELS
from cnnlab.core.validation import PositiveInt, Probability


def wide_resnet(in_channels: int, num_classes: int, depth: int, widen: int, dropout: float, batch_norm: bool,
                stochastic_depth: float) -> ResNet:
    if (depth - 4) % 6 != 0:
        raise CnnlabError(f"model.depth must be 6n + 4 (e.g. 16, 22, 28, 40), got {depth}")
    n = (depth - 4) // 6
    return use_stochastic_depth(ResNet(
        PreActBasicBlock, [n, n, n], in_channels=in_channels, num_classes=num_classes, stem="small",
        widths=(16 * widen, 32 * widen, 64 * widen), stem_width=16, batch_norm=batch_norm, dropout=dropout),
        stochastic_depth)


@MODELS.register(family="wrn")
def wrn(
    *, in_channels: int, num_classes: int, input_size: int,
    depth: PositiveInt = 28, widen: PositiveInt = 10, dropout: Probability = 0.0, batch_norm: bool = True,
    stochastic_depth: Probability = 0.0,
) -> ResNet:
    """Wide ResNet WRN-depth-widen; dropout between the convs of each block."""
    return wide_resnet(in_channels, num_classes, depth, widen, dropout, batch_norm, stochastic_depth)


@MODELS.register(family="wrn")
def wrn28_10(
    *, in_channels: int, num_classes: int, input_size: int, dropout: Probability = 0.0, batch_norm: bool = True,
    stochastic_depth: Probability = 0.0,
) -> ResNet:
    """WRN-28-10 (36.5M parameters for CIFAR-10)."""
    return wide_resnet(in_channels, num_classes, 28, 10, dropout, batch_norm, stochastic_depth)


@MODELS.register(family="wrn")
def wrn16_4(
    *, in_channels: int, num_classes: int, input_size: int, dropout: Probability = 0.0, batch_norm: bool = True,
    stochastic_depth: Probability = 0.0,
) -> ResNet:
    """WRN-16-4 (2.7M parameters for CIFAR-10)."""
    return wide_resnet(in_channels, num_classes, 16, 4, dropout, batch_norm, stochastic_depth)
