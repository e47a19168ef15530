"""Registered weight-initialisation schemes, applied to every conv and linear layer.

Fan counts follow the lectures: a conv layer's fan_in is C_in * k1 * k2
(PyTorch's own convention, so torch.nn.init computes them as taught).
Normalisation layers keep weight 1 and bias 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from cnnlab.registry import INITS
from cnnlab.validation import PositiveFloat

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _apply(model: nn.Module, init_weight: Callable[[torch.Tensor], object], zero_bias: bool) -> None:
    for module in model.modules():
        if isinstance(module, _WEIGHTED):
            init_weight(module.weight)
            if zero_bias and module.bias is not None:
                nn.init.zeros_(module.bias)


@INITS.register(family="default")
def default(*, model: nn.Module) -> None:
    """PyTorch's own initialisation (each layer's reset_parameters); leaves the model as built."""


@INITS.register(family="xavier")
def xavier_uniform(*, model: nn.Module, gain: PositiveFloat = 1.0, zero_bias: bool = True) -> None:
    """Xavier/Glorot uniform: Var(w) = gain^2 * 2 / (fan_in + fan_out)."""
    _apply(model, lambda w: nn.init.xavier_uniform_(w, gain=gain), zero_bias)


@INITS.register(family="kaiming")
def kaiming_normal(
    *, model: nn.Module, mode: Literal["fan_in", "fan_out"] = "fan_in",
    nonlinearity: Literal["relu", "leaky_relu", "linear", "tanh", "sigmoid"] = "relu",
    zero_bias: bool = True,
) -> None:
    """Kaiming/He normal: Var(w) = gain^2 / fan (gain^2 = 2 for ReLU)."""
    _apply(model, lambda w: nn.init.kaiming_normal_(w, mode=mode, nonlinearity=nonlinearity), zero_bias)
