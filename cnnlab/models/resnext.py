"""ResNeXt (Xie et al. 2017): ResNet bottlenecks whose 3x3 conv is split into `cardinality` groups.

A bottleneck's 3x3 width is cardinality x width_per_group x (stage multiplier).
"""

from __future__ import annotations

from cnnlab.models.blocks import Stem, resolve_stem
from cnnlab.models.resnet import ResNet, Variant, block_for, use_stochastic_depth
from cnnlab.core.registry import MODELS
from cnnlab.core.validation import PositiveInt, Probability


@MODELS.register(family="resnext")
def resnext29(
    *, in_channels: int, num_classes: int, input_size: int,
    cardinality: PositiveInt = 8, width: PositiveInt = 64, variant: Variant = "v1_5",
    zero_init_residual: bool = False, batch_norm: bool = True, stochastic_depth: Probability = 0.0,
) -> ResNet:
    """ResNeXt-29 for CIFAR (C x d: 8x64d by default, 32x4d with cardinality=32 width=4): 3 stages of 3 bottlenecks."""
    # 29 = 3 stages x 3 blocks x 3 layers + stem + classifier; stage outputs 256, 512, 1024.
    return use_stochastic_depth(ResNet(
        block_for("bottleneck", variant), [3, 3, 3], in_channels=in_channels, num_classes=num_classes, stem="small",
        widths=(64, 128, 256), zero_init_residual=zero_init_residual, batch_norm=batch_norm, groups=cardinality,
        base_width=width, variant=variant), stochastic_depth)


@MODELS.register(family="resnext")
def resnext50_32x4d(
    *, in_channels: int, num_classes: int, input_size: int,
    variant: Variant = "v1_5", stem: Stem = "auto", zero_init_residual: bool = False, batch_norm: bool = True,
    stochastic_depth: Probability = 0.0,
) -> ResNet:
    """ResNeXt-50 (32x4d): ResNet-50's layout [3, 4, 6, 3] with 32 groups of width 4 in the first stage."""
    return use_stochastic_depth(ResNet(
        block_for("bottleneck", variant), [3, 4, 6, 3], in_channels=in_channels, num_classes=num_classes,
        stem=resolve_stem(stem, input_size), zero_init_residual=zero_init_residual, batch_norm=batch_norm, groups=32,
        base_width=4, variant=variant), stochastic_depth)
