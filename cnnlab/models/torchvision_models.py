"""Any torchvision.models architecture by name: `model=tv model.arch=<name>`."""

from __future__ import annotations

from torch import nn

from cnnlab.core.errors import CnnlabError, suggestion
from cnnlab.core.registry import MODELS
from cnnlab.models.blocks import conv_like


def _first_conv_for(model: nn.Module, in_channels: int) -> None:
    """torchvision's models take 3 channels; give the first conv ``in_channels`` (e.g. 1 for grayscale)."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels != in_channels:
                    setattr(parent, name, conv_like(child, in_channels=in_channels))
                return


@MODELS.register(family="torchvision")
def tv(
    *, in_channels: int, num_classes: int, input_size: int,
    arch: str = "resnet18",
) -> nn.Module:
    """A torchvision.models architecture by name (`model.arch`); pretrained weights with `model.pretrained=<file>`."""
    import torchvision.models

    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        raise CnnlabError(f"unknown torchvision architecture {arch!r}{suggestion(arch, names)}; "
                          "see torchvision.models.list_models()")
    kwargs = {"aux_logits": False, "init_weights": True} if arch in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    _first_conv_for(model, in_channels)
    return model
