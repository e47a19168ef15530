"""SE-ResNet (Hu et al. 2018): every residual block gates its channels with squeeze-and-excitation."""

from __future__ import annotations

from cnnlab.models.blocks import Stem, resolve_stem
from cnnlab.models.resnet import RESNETS, ResNet, Variant, block_for, use_stochastic_depth
from cnnlab.core.registry import MODELS
from cnnlab.core.validation import PositiveInt, Probability


def _register(name: str, kind: str, layers: list[int]) -> None:
    def build(
        *, in_channels: int, num_classes: int, input_size: int,
        se_reduction: PositiveInt = 16, variant: Variant = "v1_5", stem: Stem = "auto",
        zero_init_residual: bool = False, batch_norm: bool = True, stochastic_depth: Probability = 0.0,
    ) -> ResNet:
        return use_stochastic_depth(ResNet(
            block_for(kind, variant), layers, in_channels=in_channels, num_classes=num_classes,
            stem=resolve_stem(stem, input_size), zero_init_residual=zero_init_residual, batch_norm=batch_norm,
            variant=variant, se_reduction=se_reduction), stochastic_depth)

    build.__doc__ = (f"SE-ResNet-{name.removeprefix('resnet')}: {name} with a squeeze-and-excitation gate "
                     "(reduction se_reduction) on every block's residual branch.")
    MODELS.register(build, name=f"se_{name}", family="senet")


for _name, (_kind, _layers) in RESNETS.items():
    _register(_name, _kind, _layers)
