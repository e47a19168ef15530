"""AlexNet (Krizhevsky et al. 2012), single tower and no LRN, as in torchvision."""

from __future__ import annotations

from typing import Optional

from torch import nn

from cnnlab.models.blocks import Stem, flat_features, resolve_stem
from cnnlab.core.registry import MODELS
from cnnlab.core.validation import PositiveInt, Probability


class AlexNet(nn.Module):
    # layer | large (ImageNet)        | small (CIFAR-10, the lectures' form)
    # conv1 | 11x11/4, 64, pad 2      | 3x3/1, 64, pad 1
    # pool1 | max 3x3/2 (overlapping) | max 3x3/2
    # conv2 | 5x5, 192, pad 2         | same
    # pool2 | max 3x3/2               | same
    # conv3 | 3x3, 384                | same
    # conv4 | 3x3, 256                | same
    # conv5 | 3x3, 256                | same
    # pool5 | max 3x3/2, avg to 6x6   | max 3x3/2
    # fc6-8 | 4096, 4096, classes     | fc_width (1024), fc_width, classes; dropout before fc6 and fc7
    def __init__(self, in_channels: int, num_classes: int, input_size: int, stem: str, fc_width: int, dropout: float):
        super().__init__()
        conv1 = (nn.Conv2d(in_channels, 64, 11, 4, 2) if stem == "large" else nn.Conv2d(in_channels, 64, 3, 1, 1))
        self.features = nn.Sequential(
            conv1, nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            *([nn.AdaptiveAvgPool2d(6)] if stem == "large" else []),
        )
        n = flat_features(self.features, in_channels, input_size, "alexnet")
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout), nn.Linear(n, fc_width), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(fc_width, fc_width), nn.ReLU(inplace=True),
            nn.Linear(fc_width, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


@MODELS.register(family="alexnet")
def alexnet(
    *, in_channels: int, num_classes: int, input_size: int,
    stem: Stem = "auto", fc_width: Optional[PositiveInt] = None, dropout: Probability = 0.5,
) -> AlexNet:
    """AlexNet: ImageNet form (11x11/4 stem) or the CIFAR-10 form (3x3/1 stem); fc_width null = 4096 / 1024."""
    stem = resolve_stem(stem, input_size)
    width = fc_width or (4096 if stem == "large" else 1024)
    return AlexNet(in_channels, num_classes, input_size, stem, width, dropout)
