"""Any torchvision.models architecture by name: `model=tv model.arch=<name>`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from cnnlab.errors import CnnlabError, suggestion
from cnnlab.registry import MODELS


def _first_conv_for(model: nn.Module, in_channels: int) -> None:
    """torchvision's models take 3 channels; give the first conv ``in_channels`` (e.g. 1 for grayscale)."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels != in_channels:
                    setattr(parent, name, nn.Conv2d(
                        in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                        child.dilation, child.groups, child.bias is not None))
                return


def load_weights(model: nn.Module, path: str) -> None:
    """Load a local state dict; tensors whose shape differs (a new head) keep their fresh init."""
    file = Path(path).expanduser()
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CnnlabError(f"model.weights: {file} does not exist (weights are never downloaded)") from None
    except Exception as e:
        raise CnnlabError(f"model.weights: {file} is not a readable state dict ({type(e).__name__})") from None
    state = state.get("model", state) if isinstance(state, dict) else state
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in fitting]
    if not fitting or len(missing) > len(own) // 2:
        raise CnnlabError(f"model.weights: {file} does not fit this architecture ({len(fitting)} of {len(own)} tensors match)")
    model.load_state_dict(fitting, strict=False)


@MODELS.register(family="torchvision")
def tv(
    *, in_channels: int, num_classes: int, input_size: int,
    arch: str = "resnet18", weights: Optional[str] = None,
) -> nn.Module:
    """A torchvision.models architecture by name (`model.arch`); weights only from a local file, never downloaded."""
    import torchvision.models

    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        raise CnnlabError(f"unknown torchvision architecture {arch!r}{suggestion(arch, names)}; "
                          "see torchvision.models.list_models()")
    kwargs = {"aux_logits": False, "init_weights": True} if arch in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    _first_conv_for(model, in_channels)
    if weights:
        load_weights(model, weights)
    return model
