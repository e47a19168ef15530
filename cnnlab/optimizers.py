"""Registered optimizers. ``params`` is supplied by cnnlab (the model's parameters)."""

from __future__ import annotations

import torch

from cnnlab.errors import CnnlabError
from cnnlab.registry import OPTIMIZERS
from cnnlab.validation import NonNegativeFloat, PositiveFloat, Probability, UnitInterval


@OPTIMIZERS.register(family="sgd")
def sgd(
    params, *, lr: PositiveFloat = 0.1, momentum: UnitInterval = 0.9, nesterov: bool = True,
    dampening: UnitInterval = 0.0, weight_decay: NonNegativeFloat = 5e-4,
) -> torch.optim.SGD:
    """Stochastic gradient descent, with (Nesterov) momentum and L2 weight decay."""
    if nesterov and (momentum <= 0 or dampening != 0):
        raise CnnlabError("optimizer.nesterov=true needs optimizer.momentum > 0 and optimizer.dampening=0")
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov,
                           dampening=dampening, weight_decay=weight_decay)


@OPTIMIZERS.register(family="adam")
def adam(
    params, *, lr: PositiveFloat = 1e-3, betas: tuple[Probability, Probability] = (0.9, 0.999),
    eps: PositiveFloat = 1e-8, weight_decay: NonNegativeFloat = 0.0,
) -> torch.optim.Adam:
    """Adam (Kingma & Ba): per-parameter steps from running moments of the gradient; weight decay as L2 in the gradient."""
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


@OPTIMIZERS.register(family="adam")
def adamw(
    params, *, lr: PositiveFloat = 1e-3, betas: tuple[Probability, Probability] = (0.9, 0.999),
    eps: PositiveFloat = 1e-8, weight_decay: NonNegativeFloat = 0.01,
) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter): Adam with weight decay decoupled from the gradient."""
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
