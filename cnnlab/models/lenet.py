"""LeNet-5 (LeCun et al., 1998)."""

from __future__ import annotations

from typing import Literal

from torch import nn

from cnnlab.models.blocks import FractionalMaxPool, flat_features
from cnnlab.core.registry import MODELS
from cnnlab.core.validation import Probability


class LeNet5(nn.Module):
    # layer  | kind              | maps | kernel
    # C1     | conv              | 6    | 5x5   (28x28 inputs are padded by 2 to the paper's 32x32)
    # S2     | subsampling       | 6    | 2x2
    # C3     | conv              | 16   | 5x5
    # S4     | subsampling       | 16   | 2x2
    # C5     | fully connected   | 120  |
    # F6     | fully connected   | 84   |
    # output | fully connected   | classes
    def __init__(self, in_channels: int, num_classes: int, input_size: int,
                 variant: str = "modern", dropout: float = 0.0, fractional_pool: bool = False):
        super().__init__()
        act = nn.Tanh if variant == "classic" else nn.ReLU
        if fractional_pool:
            pool = lambda _size: FractionalMaxPool()  # noqa: E731
        else:
            pool = nn.AvgPool2d if variant == "classic" else nn.MaxPool2d
        pad = max(0, (32 - input_size) // 2)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=pad), act(), pool(2),  # C1, S2
            nn.Conv2d(6, 16, 5), act(), pool(2),                        # C3, S4
        )
        n = flat_features(self.features, in_channels, input_size, "lenet5")
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(n, 120), act(), nn.Dropout(dropout),   # C5
            nn.Linear(120, 84), act(), nn.Dropout(dropout),  # F6
            nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


@MODELS.register(family="lenet")
def lenet5(
    *, in_channels: int, num_classes: int, input_size: int,
    variant: Literal["classic", "modern"] = "modern",
    dropout: Probability = 0.0,
    fractional_pool: bool = False,
) -> LeNet5:
    """LeNet-5: classic (tanh, average pooling) or modern (ReLU, max pooling); dropout on the fully connected
    layers; fractional_pool: fractional max-pooling in S2 and S4."""
    return LeNet5(in_channels, num_classes, input_size, variant, dropout, fractional_pool)
