"""VGG (Simonyan & Zisserman 2015), configurations A, B, D, E, each with a batch-norm twin."""

from __future__ import annotations

from typing import Literal

from torch import nn

from cnnlab.models.blocks import Stem, conv_bn_act, pool2x2, resolve_stem
from cnnlab.core.registry import MODELS
from cnnlab.core.validation import Probability

# Table 1: 3x3 conv widths, "M" a 2x2 max-pool
CONFIGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],                               # A
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],                      # B
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],       # D
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],                                                                      # E
}


class VGG(nn.Module):
    """features -> classifier.

    classifier="linear": ImageNet (large inputs): 7x7 pool, fc 4096 -> 4096 -> classes; small inputs (the
    CIFAR variant): the five pools leave 1x1, fc 512 -> 512 -> classes. Dropout before each hidden fc's
    successor, as in the paper. classifier="gap": global average pooling -> one linear layer.
    """

    def __init__(self, config: list, in_channels: int, num_classes: int, stem: str, batch_norm: bool,
                 classifier: str, dropout: float, fractional_pool: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for v in config:
            if v == "M":  # ceil_mode lets 28x28 inputs survive five halvings (28-14-7-4-2-1)
                layers.append(pool2x2(fractional_pool, ceil_mode=stem == "small"))
            else:
                layers.append(conv_bn_act(prev, v, batch_norm=batch_norm))
                prev = v
        self.features = nn.Sequential(*layers)
        if classifier == "gap":
            self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(prev, num_classes))
        else:
            pool, width = (7, 4096) if stem == "large" else (1, 512)
            self.classifier = nn.Sequential(
                nn.AdaptiveAvgPool2d(pool), nn.Flatten(),
                nn.Linear(prev * pool * pool, width), nn.ReLU(inplace=True), nn.Dropout(dropout),
                nn.Linear(width, width), nn.ReLU(inplace=True), nn.Dropout(dropout),
                nn.Linear(width, num_classes),
            )

    def forward(self, x):
        return self.classifier(self.features(x))


def _register(name: str, batch_norm: bool) -> None:
    def build(
        *, in_channels: int, num_classes: int, input_size: int,
        classifier: Literal["linear", "gap"] = "linear", dropout: Probability = 0.5, stem: Stem = "auto",
        fractional_pool: bool = False,
    ) -> VGG:
        return VGG(CONFIGS[name], in_channels, num_classes, resolve_stem(stem, input_size), batch_norm, classifier, dropout,
                   fractional_pool)

    convs = sum(1 for v in CONFIGS[name] if v != "M")
    build.__doc__ = (f"VGG-{convs + 3}: {convs} 3x3 convs in 5 blocks, 3 fc layers"
                     + (", batch norm after each conv." if batch_norm else "."))
    MODELS.register(build, name=f"{name}_bn" if batch_norm else name, family="vgg")


for _name in CONFIGS:
    _register(_name, batch_norm=False)
    _register(_name, batch_norm=True)
