"""A small residual CNN, cnnlab's default: fast on a CPU, > 91% on Fashion-MNIST in a minute."""

from __future__ import annotations

from torch import nn

from cnnlab.core.errors import CnnlabError
from cnnlab.models.blocks import conv_bn_act, flat_features, pool2x2
from cnnlab.models.resnet import BasicBlock, use_stochastic_depth
from cnnlab.core.registry import MODELS
from cnnlab.core.validation import NonNegativeInt, PositiveInt, Probability


class SmallResNet(nn.Module):
    # stage i: conv3x3(widths[i]) -> BN -> ReLU -> max-pool 2x2 -> blocks[i] x BasicBlock(widths[i])
    # head:    flatten -> dropout -> linear
    # Defaults (widths [32, 64], blocks [0, 1]) on 28x28: 28->14 (32 maps) -> 7 (64 maps, one residual block).
    def __init__(self, in_channels: int, num_classes: int, input_size: int,
                 widths: list[int], blocks: list[int], batch_norm: bool, dropout: float, fractional_pool: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for width, n_blocks in zip(widths, blocks):
            layers += [conv_bn_act(prev, width, batch_norm=batch_norm), pool2x2(fractional_pool)]
            layers += [BasicBlock(width, width, batch_norm=batch_norm) for _ in range(n_blocks)]
            prev = width
        self.features = nn.Sequential(*layers)
        n = flat_features(self.features, in_channels, input_size, "small_resnet")
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(n, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


@MODELS.register(family="resnet")
def small_resnet(
    *, in_channels: int, num_classes: int, input_size: int,
    widths: list[PositiveInt] = [32, 64],  # noqa: B006
    blocks: list[NonNegativeInt] = [0, 1],  # noqa: B006
    batch_norm: bool = True,
    dropout: Probability = 0.0,
    stochastic_depth: Probability = 0.0,
    fractional_pool: bool = False,
) -> SmallResNet:
    """Small residual CNN: per stage conv-BN-ReLU, 2x2 max-pool, residual blocks; linear head. The default model."""
    if len(widths) != len(blocks):
        raise CnnlabError(f"model.widths ({len(widths)} stages) and model.blocks ({len(blocks)} stages) must have the same length")
    if input_size >> len(widths) < 1:
        raise CnnlabError(f"model.widths has {len(widths)} stages, which halve {input_size}x{input_size} inputs to nothing")
    return use_stochastic_depth(SmallResNet(in_channels, num_classes, input_size, widths, blocks, batch_norm, dropout,
                                            fractional_pool), stochastic_depth)
