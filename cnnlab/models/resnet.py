"""ResNet (He et al. 2016), its pre-activation form (v2) and the blocks the family shares.

ResNeXt (resnext.py), SE-ResNet (senet.py), wide ResNets (wrn.py) and the small
default model (small_resnet.py) are configurations of the ResNet class below,
not copies of it.

Block variants:
- v1:   bottleneck stride in the first 1x1 conv (the original paper)
- v1_5: bottleneck stride in the 3x3 conv (torchvision's ResNet)
- v2:   pre-activation, BN -> ReLU -> conv (He et al., "Identity Mappings", 2016)
Shortcuts are identities, or a strided 1x1 projection (+BN) when the shape changes.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from cnnlab.models.blocks import SqueezeExcite, Stem, norm2d, resolve_stem
from cnnlab.core.registry import MODELS
from cnnlab.core.validation import Probability

Variant = Literal["v1", "v1_5", "v2"]


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=bias)


class _Residual(nn.Module):
    """out = ReLU(shortcut(x) + SE(body(x))); pre-activation blocks override forward (no ReLU after the sum)."""

    expansion = 1
    preact = False

    def _finish(self, in_ch: int, out_ch: int, stride: int, batch_norm: bool, se_reduction: int | None) -> None:
        self.se = SqueezeExcite(out_ch, se_reduction) if se_reduction else nn.Identity()
        self.drop_path: nn.Module = nn.Identity()  # stochastic depth (use_stochastic_depth)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            projection = _conv(in_ch, out_ch, 1, stride, bias=not batch_norm)
            # Pre-activation blocks project the already normalised input, so no BN of their own.
            self.shortcut = projection if self.preact else nn.Sequential(projection, norm2d(out_ch, batch_norm))
        if not self.preact:
            self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.shortcut(x) + self.drop_path(self.se(self.body(x))))

    def last_norm(self) -> nn.Module:
        """The body's last layer (BN, or the last conv in v2): zero-init makes the block an identity."""
        return self.body[-1]


class BasicBlock(_Residual):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, + shortcut, -> ReLU."""

    def __init__(self, in_ch: int, planes: int, stride: int = 1, *, batch_norm: bool = True,
                 se_reduction: int | None = None, dropout: float = 0.0, **_unused):
        super().__init__()
        self.body = nn.Sequential(
            _conv(in_ch, planes, 3, stride, bias=not batch_norm), norm2d(planes, batch_norm), nn.ReLU(inplace=True),
            *([nn.Dropout(dropout)] if dropout > 0 else []),
            _conv(planes, planes, 3, bias=not batch_norm), norm2d(planes, batch_norm),
        )
        self._finish(in_ch, planes, stride, batch_norm, se_reduction)


class Bottleneck(_Residual):
    """1x1 (reduce) -> 3x3 (grouped for ResNeXt) -> 1x1 (expand x4), BN after each, + shortcut, -> ReLU."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, *, variant: str = "v1_5", groups: int = 1,
                 base_width: int = 64, batch_norm: bool = True, se_reduction: int | None = None, **_unused):
        super().__init__()
        width = int(planes * base_width / 64) * groups
        out_ch = planes * self.expansion
        s1, s3 = (stride, 1) if variant == "v1" else (1, stride)
        self.body = nn.Sequential(
            _conv(in_ch, width, 1, s1, bias=not batch_norm), norm2d(width, batch_norm), nn.ReLU(inplace=True),
            _conv(width, width, 3, s3, groups, bias=not batch_norm), norm2d(width, batch_norm), nn.ReLU(inplace=True),
            _conv(width, out_ch, 1, bias=not batch_norm), norm2d(out_ch, batch_norm),
        )
        self._finish(in_ch, out_ch, stride, batch_norm, se_reduction)


class PreActBasicBlock(_Residual):
    """BN -> ReLU -> conv3x3 -> (dropout, WRN) -> BN -> ReLU -> conv3x3, + shortcut."""

    preact = True

    def __init__(self, in_ch: int, planes: int, stride: int = 1, *, batch_norm: bool = True,
                 se_reduction: int | None = None, dropout: float = 0.0, **_unused):
        super().__init__()
        self.pre = nn.Sequential(norm2d(in_ch, batch_norm), nn.ReLU(inplace=True))
        self.body = nn.Sequential(
            _conv(in_ch, planes, 3, stride),
            norm2d(planes, batch_norm), nn.ReLU(inplace=True),
            *([nn.Dropout(dropout)] if dropout > 0 else []),
            _conv(planes, planes, 3),
        )
        self._finish(in_ch, planes, stride, batch_norm, se_reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pre(x)
        # The projection sees the pre-activated input; an identity shortcut carries x itself.
        shortcut = x if isinstance(self.shortcut, nn.Identity) else self.shortcut(out)
        return shortcut + self.drop_path(self.se(self.body(out)))


class PreActBottleneck(_Residual):
    """BN -> ReLU -> 1x1 -> BN -> ReLU -> 3x3 (stride) -> BN -> ReLU -> 1x1 (x4), + shortcut."""

    expansion = 4
    preact = True

    def __init__(self, in_ch: int, planes: int, stride: int = 1, *, groups: int = 1, base_width: int = 64,
                 batch_norm: bool = True, se_reduction: int | None = None, **_unused):
        super().__init__()
        width = int(planes * base_width / 64) * groups
        out_ch = planes * self.expansion
        self.pre = nn.Sequential(norm2d(in_ch, batch_norm), nn.ReLU(inplace=True))
        self.body = nn.Sequential(
            _conv(in_ch, width, 1),
            norm2d(width, batch_norm), nn.ReLU(inplace=True), _conv(width, width, 3, stride, groups),
            norm2d(width, batch_norm), nn.ReLU(inplace=True), _conv(width, out_ch, 1),
        )
        self._finish(in_ch, out_ch, stride, batch_norm, se_reduction)

    forward = PreActBasicBlock.forward


class ResNet(nn.Module):
    """stem -> stages of residual blocks (stride 2 from the second stage on) -> [BN-ReLU if pre-act] -> GAP -> linear.

    Stems: large = conv7x7/2 (64) -> BN -> ReLU -> max-pool 3x3/2; small (CIFAR) = conv3x3/1, no pooling.
    """

    def __init__(
        self, block: type[_Residual], layers: list[int], *, in_channels: int, num_classes: int, stem: str,
        widths: tuple[int, ...] = (64, 128, 256, 512), stem_width: int = 64, zero_init_residual: bool = False,
        batch_norm: bool = True, **block_kwargs,
    ):
        super().__init__()
        preact = block.preact
        if stem == "large":
            self.stem = nn.Sequential(
                _conv(in_channels, stem_width, 7, 2, bias=not batch_norm), norm2d(stem_width, batch_norm),
                nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        elif preact:  # the first pre-activation block normalises the stem's output itself
            self.stem = nn.Sequential(_conv(in_channels, stem_width, 3))
        else:
            self.stem = nn.Sequential(_conv(in_channels, stem_width, 3, bias=not batch_norm),
                                      norm2d(stem_width, batch_norm), nn.ReLU(inplace=True))
        stages, in_ch = [], stem_width
        for i, (planes, n) in enumerate(zip(widths, layers)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(in_ch, planes, stride, batch_norm=batch_norm, **block_kwargs))
                in_ch = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.final = nn.Sequential(norm2d(in_ch, batch_norm), nn.ReLU(inplace=True)) if preact else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:  # each block starts as an identity (Goyal et al. 2017)
            for m in self.modules():
                if isinstance(m, _Residual):
                    nn.init.zeros_(m.last_norm().weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.final(self.stages(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def use_stochastic_depth(model: nn.Module, final_rate: float) -> nn.Module:
    """Stochastic depth (Huang et al. 2016): block l of L drops its residual branch with probability
    l / L x final_rate while training (the linear decay rule), per sample, scaled by 1 / (1 - p) when
    kept (torchvision.ops.StochasticDepth), so evaluation runs every block as it is."""
    from torchvision.ops import StochasticDepth  # here: importing torchvision costs a second (torch._dynamo)

    blocks = [m for m in model.modules() if isinstance(m, _Residual)]
    for depth, block in enumerate(blocks, start=1):
        if final_rate > 0:
            block.drop_path = StochasticDepth(final_rate * depth / len(blocks), mode="row")
    return model


def block_for(kind: str, variant: str) -> type[_Residual]:
    if variant == "v2":
        return PreActBasicBlock if kind == "basic" else PreActBottleneck
    return BasicBlock if kind == "basic" else Bottleneck


# ResNet for ImageNet (He et al. 2016, Table 1): block, blocks per stage (conv2_x .. conv5_x)
RESNETS = {
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
    "resnet101": ("bottleneck", [3, 4, 23, 3]),
    "resnet152": ("bottleneck", [3, 8, 36, 3]),
}


def _register_resnet(name: str, kind: str, layers: list[int]) -> None:
    depth = name.removeprefix("resnet")

    def build(
        *, in_channels: int, num_classes: int, input_size: int,
        variant: Variant = "v1_5", stem: Stem = "auto", zero_init_residual: bool = False, batch_norm: bool = True,
        stochastic_depth: Probability = 0.0,
    ) -> ResNet:
        return use_stochastic_depth(ResNet(
            block_for(kind, variant), layers, in_channels=in_channels, num_classes=num_classes,
            stem=resolve_stem(stem, input_size), zero_init_residual=zero_init_residual, batch_norm=batch_norm,
            variant=variant), stochastic_depth)

    build.__doc__ = f"ResNet-{depth} ({kind} blocks {layers}); variant v1, v1_5 (stride in the 3x3) or v2 (pre-activation)."
    MODELS.register(build, name=name, family="resnet")


for _name, (_kind, _layers) in RESNETS.items():
    _register_resnet(_name, _kind, _layers)
