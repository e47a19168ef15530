"""Parameters and forward FLOPs of a registered model, without allocating or computing anything.

The model is built on PyTorch's meta device and run once under
torch.utils.flop_counter.FlopCounterMode, which counts from shapes alone. FLOPs
are those of convolutions and matrix products, 2 per multiply-add.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from cnnlab.core.errors import CnnlabError
from cnnlab.core.registry import MODELS


LARGEST_PROBED = 1024  # the smallest input a model takes is looked for up to this size


def _on_meta(name: str, options: dict[str, Any] | None, in_channels: int, input_size: int, num_classes: int):
    with torch.device("meta"):
        model = MODELS.build(name, options or {}, prefix="model", in_channels=in_channels,
                             num_classes=num_classes, input_size=input_size)
        x = torch.zeros(2, in_channels, input_size, input_size)  # 2: batch norm takes more than one value
    return model.eval(), x


def _runs(model: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether a model built on the meta device runs forward on ``x``."""
    if getattr(model, "memorises", False):  # k-NN: any size; its forward needs what it remembered
        return True
    try:
        with torch.no_grad():
            model(x)
    except (RuntimeError, CnnlabError):  # a kernel larger than its map
        return False
    return True


def _takes(name: str, options: dict[str, Any] | None, in_channels: int, size: int, num_classes: int) -> bool:
    try:
        model, x = _on_meta(name, options, in_channels, size, num_classes)
    except CnnlabError:  # the model's own "shrinks to nothing"
        return False
    return _runs(model, x)


def smallest_input(name: str, options: dict[str, Any] | None, in_channels: int, input_size: int,
                   num_classes: int) -> int | None:
    """The smallest image size (above ``input_size``, which fails) model ``name`` runs on; None up to
    LARGEST_PROBED. Doubling, then bisection: about 2 log2(size) forward passes on the meta device."""
    low, high = input_size, input_size * 2
    while high <= LARGEST_PROBED and not _takes(name, options, in_channels, high, num_classes):
        low, high = high, high * 2
    if high > LARGEST_PROBED:
        return None
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if _takes(name, options, in_channels, middle, num_classes) else (middle, high)
    return high


def check_input_size(name: str, options: dict[str, Any] | None, in_channels: int, input_size: int,
                     num_classes: int, label: str | None = None) -> None:
    """Refuse, in one line naming the smallest input it takes, a model whose feature maps shrink below a kernel
    at ``input_size`` (a forward pass on the meta device: nothing is allocated or computed)."""
    try:
        model, x = _on_meta(name, options, in_channels, input_size, num_classes)
    except CnnlabError:
        if not _takes(name, options, in_channels, LARGEST_PROBED, num_classes):
            raise  # not about the size (an option the model refuses): its own line
    else:
        if _runs(model, x):
            return
    label = label or f"model {name}"
    size = smallest_input(name, options, in_channels, input_size, num_classes)
    if size is None:
        raise CnnlabError(f"{label} does not run on {in_channels}x{input_size}x{input_size} images, nor on any size "
                          f"up to {LARGEST_PROBED}x{LARGEST_PROBED}")
    raise CnnlabError(f"{label} does not take {in_channels}x{input_size}x{input_size} images: its feature maps shrink "
                      f"below a kernel; the smallest input it takes is {in_channels}x{size}x{size}")


def measure(name: str, in_channels: int, input_size: int, num_classes: int,
            options: dict[str, Any] | None = None) -> tuple[int, int]:
    """(parameters, forward FLOPs for one image) of model ``name``."""
    model, x = _on_meta(name, options, in_channels, input_size, num_classes)
    params = sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter:
        model(x[:1])
    return params, counter.get_total_flops()
