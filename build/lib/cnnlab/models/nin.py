"""Network in Network (Lin et al. 2014): mlpconv blocks and global average pooling, no fc layers."""

from __future__ import annotations

from torch import nn

from cnnlab.models.blocks import Stem, conv_bn_act, resolve_stem
from cnnlab.core.registry import MODELS
from cnnlab.core.validation import Probability


class NiN(nn.Module):
    # CIFAR-10 NiN: an mlpconv block is a conv followed by two 1x1 convs (a per-pixel MLP), ReLU after each.
    # block | conv                              | 1x1 | 1x1
    # 1     | 5x5, 192 (large stem: 11x11/4)   | 160 | 96       -> max-pool 3x3/2 (ceil), dropout
    # 2     | 5x5, 192                          | 192 | 192      -> max-pool 3x3/2 (ceil), dropout
    # 3     | 3x3, 192                          | 192 | classes  -> global average pooling
    def __init__(self, in_channels: int, num_classes: int, stem: str, dropout: float, batch_norm: bool):
        super().__init__()

        def mlpconv(in_ch: int, out: int, kernel: int, m1: int, m2: int, stride: int = 1, last_act: bool = True):
            pad = 0 if stride > 1 else kernel // 2
            return [conv_bn_act(in_ch, out, kernel, stride, padding=pad, batch_norm=batch_norm),
                    conv_bn_act(out, m1, 1, batch_norm=batch_norm),
                    conv_bn_act(m1, m2, 1, batch_norm=batch_norm and last_act, act="relu" if last_act else None)]

        first = mlpconv(in_channels, 192, 11, 160, 96, stride=4) if stem == "large" else mlpconv(in_channels, 192, 5, 160, 96)
        self.features = nn.Sequential(
            *first, nn.MaxPool2d(3, 2, ceil_mode=True), nn.Dropout(dropout),
            *mlpconv(96, 192, 5, 192, 192), nn.MaxPool2d(3, 2, ceil_mode=True), nn.Dropout(dropout),
            # The last 1x1 conv makes one map per class, which global average pooling turns into logits.
            *mlpconv(192, 192, 3, 192, num_classes, last_act=False),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.features(x)).flatten(1)


@MODELS.register(family="nin")
def nin(
    *, in_channels: int, num_classes: int, input_size: int,
    stem: Stem = "auto", dropout: Probability = 0.5, batch_norm: bool = False,
) -> NiN:
    """Network in Network for CIFAR-10: three mlpconv blocks (1x1 convs), 3x3/2 max-pools, global average pooling."""
    return NiN(in_channels, num_classes, resolve_stem(stem, input_size), dropout, batch_norm)
