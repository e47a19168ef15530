"""Parameters and forward FLOPs of a registered model, without allocating or computing anything.

The model is built on PyTorch's meta device and run once under
torch.utils.flop_counter.FlopCounterMode, which counts from shapes alone. FLOPs
are those of convolutions and matrix products, 2 per multiply-add.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from cnnlab.core.registry import MODELS


def measure(name: str, in_channels: int, input_size: int, num_classes: int,
            options: dict[str, Any] | None = None) -> tuple[int, int]:
    """(parameters, forward FLOPs for one image) of model ``name``."""
    with torch.device("meta"):
        model = MODELS.build(name, options or {}, prefix="model", in_channels=in_channels,
                             num_classes=num_classes, input_size=input_size)
        x = torch.zeros(1, in_channels, input_size, input_size)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter:
        model(x)
    return params, counter.get_total_flops()
