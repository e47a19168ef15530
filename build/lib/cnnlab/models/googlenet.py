"""GoogLeNet / Inception v1 (Szegedy et al. 2015)."""

from __future__ import annotations

import torch
from torch import nn

from cnnlab.models.blocks import Stem, WithAux, conv_bn_act, resolve_stem
from cnnlab.core.registry import MODELS
from cnnlab.core.validation import NonNegativeFloat, Probability

# Table 1: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj
INCEPTIONS = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}


class Inception(nn.Module):
    """Four parallel branches concatenated: 1x1 | 1x1 -> 3x3 | 1x1 -> 5x5 | 3x3 max-pool -> 1x1."""

    def __init__(self, in_ch: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, pool_proj: int, batch_norm: bool):
        super().__init__()
        bn = {"batch_norm": batch_norm}
        self.branch1 = conv_bn_act(in_ch, c1, 1, **bn)
        self.branch3 = nn.Sequential(conv_bn_act(in_ch, c3r, 1, **bn), conv_bn_act(c3r, c3, 3, **bn))
        self.branch5 = nn.Sequential(conv_bn_act(in_ch, c5r, 1, **bn), conv_bn_act(c5r, c5, 5, **bn))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn_act(in_ch, pool_proj, 1, **bn))
        self.out_channels = c1 + c3 + c5 + pool_proj

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)], 1)


class AuxClassifier(nn.Module):
    """Side head on 4a and 4d: average pool to 4x4 -> 1x1 conv 128 -> fc 1024 -> dropout 0.7 -> fc."""

    def __init__(self, in_ch: int, num_classes: int, batch_norm: bool):
        super().__init__()
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(4), conv_bn_act(in_ch, 128, 1, batch_norm=batch_norm), nn.Flatten(),
            nn.Linear(128 * 16, 1024), nn.ReLU(inplace=True), nn.Dropout(0.7), nn.Linear(1024, num_classes),
        )

    def forward(self, x):
        return self.head(x)


class GoogLeNet(nn.Module):
    # large stem: conv 7x7/2, 64 -> max-pool 3/2 -> conv 1x1, 64 -> conv 3x3, 192 -> max-pool 3/2
    # small stem (CIFAR): conv 3x3, 192
    # then 3a 3b | max-pool 3/2 | 4a 4b 4c 4d 4e | max-pool 3/2 | 5a 5b | global avg pool, dropout, fc
    def __init__(self, in_channels: int, num_classes: int, stem: str, batch_norm: bool, dropout: float,
                 aux_classifiers: bool, aux_weight: float):
        super().__init__()
        bn = {"batch_norm": batch_norm}
        if stem == "large":
            self.stem = nn.Sequential(
                conv_bn_act(in_channels, 64, 7, 2, **bn), nn.MaxPool2d(3, 2, ceil_mode=True),
                conv_bn_act(64, 64, 1, **bn), conv_bn_act(64, 192, 3, **bn), nn.MaxPool2d(3, 2, ceil_mode=True))
        else:
            self.stem = conv_bn_act(in_channels, 192, 3, **bn)
        blocks, prev = {}, 192
        for name, widths in INCEPTIONS.items():
            blocks[name] = Inception(prev, *widths, batch_norm=batch_norm)
            prev = blocks[name].out_channels
        self.inception = nn.ModuleDict(blocks)
        self.pool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.aux = nn.ModuleList([AuxClassifier(512, num_classes, batch_norm), AuxClassifier(528, num_classes, batch_norm)]) \
            if aux_classifiers else None
        self.aux_weight = aux_weight
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(prev, num_classes))

    def forward(self, x):
        x = self.stem(x)
        aux = []
        for name, block in self.inception.items():
            if name in ("4a", "5a"):
                x = self.pool(x)
            x = block(x)
            if self.aux is not None and self.training and name in ("4a", "4d"):
                aux.append(self.aux[0 if name == "4a" else 1](x))
        logits = self.head(x)
        return WithAux(logits, aux, self.aux_weight) if aux else logits


@MODELS.register(family="googlenet")
def googlenet(
    *, in_channels: int, num_classes: int, input_size: int,
    stem: Stem = "auto", batch_norm: bool = True, dropout: Probability = 0.4,
    aux_classifiers: bool = False, aux_weight: NonNegativeFloat = 0.3,
) -> GoogLeNet:
    """GoogLeNet (Inception v1); auxiliary classifiers on 4a and 4d add aux_weight x their loss while training."""
    return GoogLeNet(in_channels, num_classes, resolve_stem(stem, input_size), batch_norm, dropout, aux_classifiers, aux_weight)
