"""Looking inside a model: one forward pass in evaluation mode, watched by forward hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


@torch.no_grad()
def forward_with_hooks(model: nn.Module, x: torch.Tensor, hooks: Iterable[tuple[nn.Module, Callable]]) -> None:
    """Run ``x`` through ``model`` in evaluation mode with ``hook(module, inputs, output)`` on each
    (module, hook); the hooks are removed and the model's mode given back afterwards."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
