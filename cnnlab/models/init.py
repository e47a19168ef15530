"""Registered weight-initialisation schemes, applied to every conv and linear layer.

Fan counts follow the lectures: a conv layer's fan_in is C_in * k1 * k2
(PyTorch's own convention, so torch.nn.init computes them as taught).
Normalisation layers keep weight 1 and bias 0.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from cnnlab.core.registry import INITS
from cnnlab.core.validation import PositiveFloat
from cnnlab.models.blocks import activation_name

Nonlinearity = Literal["auto", "relu", "leaky_relu", "linear", "tanh", "sigmoid"]

# The gain each activation needs (torch.nn.init.calculate_gain's name and parameter). ELU and GELU
# are ReLU-like for the variance; maxout of two zero-mean pieces keeps it (E[max(a, b)^2] = E[a^2]);
# LeCun's scaled tanh was made for unit gain; PReLU starts at slope 0.25.
_GAINS: dict[str, tuple[str, float | None]] = {
    "relu": ("relu", None), "elu": ("relu", None), "gelu": ("relu", None), "leaky_relu": ("leaky_relu", 0.01),
    "prelu": ("leaky_relu", 0.25), "tanh": ("tanh", None), "sigmoid": ("sigmoid", None),
    "lecun_tanh": ("linear", None), "maxout": ("linear", None),
}


def model_activation(model: nn.Module) -> str:
    """The activation most of ``model``'s activation modules are (relu when it has none)."""
    found = Counter(name for m in model.modules() if (name := activation_name(m)) is not None)
    return found.most_common(1)[0][0] if found else "relu"


def kaiming_gain(model: nn.Module, nonlinearity: str) -> tuple[str, float]:
    """(nonlinearity, a) for torch's kaiming init; "auto" reads the model's own activation."""
    if nonlinearity != "auto":
        return nonlinearity, 0.0
    name, a = _GAINS[model_activation(model)]
    return name, a or 0.0

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
    nonlinearity: Nonlinearity = "auto",
    zero_bias: bool = True,
) -> None:
    """Kaiming/He normal: Var(w) = gain^2 / fan (gain^2 = 2 for ReLU); auto: the gain of the model's activation."""
    name, a = kaiming_gain(model, nonlinearity)
    _apply(model, lambda w: nn.init.kaiming_normal_(w, a=a, mode=mode, nonlinearity=name), zero_bias)


@INITS.register(family="kaiming")
def kaiming_uniform(
    *, model: nn.Module, mode: Literal["fan_in", "fan_out"] = "fan_in", nonlinearity: Nonlinearity = "auto",
    zero_bias: bool = True,
) -> None:
    """Kaiming/He uniform: U(-b, b) with Var(w) = b^2 / 3 = gain^2 / fan; auto: the gain of the model's activation."""
    name, a = kaiming_gain(model, nonlinearity)
    _apply(model, lambda w: nn.init.kaiming_uniform_(w, a=a, mode=mode, nonlinearity=name), zero_bias)


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
