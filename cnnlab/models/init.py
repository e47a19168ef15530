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

from cnnlab.core.registry import INITS
from cnnlab.core.validation import PositiveFloat

Nonlinearity = Literal["relu", "leaky_relu", "linear", "tanh", "sigmoid"]

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
    nonlinearity: Nonlinearity = "relu",
    zero_bias: bool = True,
) -> None:
    """Kaiming/He normal: Var(w) = gain^2 / fan (gain^2 = 2 for ReLU)."""
    _apply(model, lambda w: nn.init.kaiming_normal_(w, mode=mode, nonlinearity=nonlinearity), zero_bias)


@INITS.register(family="kaiming")
def kaiming_uniform(
    *, model: nn.Module, mode: Literal["fan_in", "fan_out"] = "fan_in", nonlinearity: Nonlinearity = "relu",
    zero_bias: bool = True,
) -> None:
    """Kaiming/He uniform: U(-b, b) with Var(w) = b^2 / 3 = gain^2 / fan."""
    _apply(model, lambda w: nn.init.kaiming_uniform_(w, mode=mode, nonlinearity=nonlinearity), zero_bias)


@INITS.register(family="xavier")
def xavier_normal(*, model: nn.Module, gain: PositiveFloat = 1.0, zero_bias: bool = True) -> None:
    """Xavier/Glorot normal: Var(w) = gain^2 * 2 / (fan_in + fan_out)."""
    _apply(model, lambda w: nn.init.xavier_normal_(w, gain=gain), zero_bias)


@INITS.register(family="lecun")
def lecun_normal(*, model: nn.Module, zero_bias: bool = True) -> None:
    """LeCun normal: Var(w) = 1 / fan_in; keeps unit variance through tanh-like layers."""
    _apply(model, lambda w: nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="linear"), zero_bias)


@INITS.register(family="orthogonal")
def orthogonal(*, model: nn.Module, gain: PositiveFloat = 1.0, zero_bias: bool = True) -> None:
    """(Semi-)orthogonal weight matrices (Saxe et al. 2014), a conv's kernel flattened to C_out x C_in*k1*k2."""
    _apply(model, lambda w: nn.init.orthogonal_(w, gain=gain), zero_bias)


@INITS.register(family="normal")
def normal(*, model: nn.Module, std: PositiveFloat = 0.01, zero_bias: bool = True) -> None:
    """N(0, std^2) for every weight, whatever the layer's size: the lectures' 'small random numbers'."""
    _apply(model, lambda w: nn.init.normal_(w, 0.0, std), zero_bias)
