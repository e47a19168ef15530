"""Batched augmentation on the training device, with randomness per sample.

Each registered op builds a function ``(x, generator) -> x`` on a float batch
(N, C, H, W) in [0, 1]. ``conf/augment/<pipeline>.yaml`` lists ops in order with
their options; any option is overridable, e.g. ``augment.ops.random_crop.padding=2``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from cnnlab.errors import CnnlabError
from cnnlab.registry import AUGMENTS
from cnnlab.validation import NonNegativeInt, UnitInterval

BatchOp = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _per_sample(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    """Boolean mask (N, 1, 1, 1): which images an op with probability p touches."""
    return (torch.rand(x.shape[0], device=x.device, generator=g) < p).view(-1, 1, 1, 1)


@AUGMENTS.register(family="flip")
def hflip(*, p: UnitInterval = 0.5) -> BatchOp:
    """Mirror each image left-right with probability p."""

    def op(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return torch.where(_per_sample(x, p, g), x.flip(3), x)

    return op


@AUGMENTS.register(family="crop")
def random_crop(*, padding: NonNegativeInt = 4, fill: Literal["zero", "reflect"] = "zero") -> BatchOp:
    """Pad each side by `padding` pixels and crop back to the original size at a random offset per image."""

    def op(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if padding == 0:
            return x
        n, c, h, w = x.shape
        mode = "constant" if fill == "zero" else "reflect"
        padded = F.pad(x, (padding,) * 4, mode=mode)
        dy = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=g)
        dx = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=g)
        rows = (dy[:, None] + torch.arange(h, device=x.device)).view(n, 1, h, 1)
        cols = (dx[:, None] + torch.arange(w, device=x.device)).view(n, 1, 1, w)
        batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
        chans = torch.arange(c, device=x.device).view(1, c, 1, 1)
        return padded[batch, chans, rows, cols]

    return op


def build_ops(ops: Mapping[str, Mapping[str, Any] | None]) -> list[BatchOp]:
    """Build the ops of a pipeline config, in order, validating each op's options."""
    if not isinstance(ops, Mapping):
        raise CnnlabError("augment.ops must be a mapping of op name to its options")
    return [AUGMENTS.build(name, options or {}, prefix=f"augment.ops.{name}") for name, options in ops.items()]


class BatchPipeline:
    """uint8 batch -> float in [0, 1] -> augmentation ops -> normalisation."""

    def __init__(
        self, ops: Sequence[BatchOp], mean: Sequence[float], std: Sequence[float],
        device: torch.device, seed: int, channels_last: bool = False,
    ):
        self.ops = list(ops)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255)
        for op in self.ops:
            x = op(x, self.generator)
        return ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)
