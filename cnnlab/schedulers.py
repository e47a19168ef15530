"""Registered learning-rate schedules, each a closed form of training progress.

Every schedule is a LambdaLR stepped once per optimizer update. Its factor is a
function of the epochs elapsed since warmup ended: fractional with
``interval=step``, whole epochs with ``interval=epoch``. An optional linear
warmup of ``warmup_epochs`` precedes it, and the schedule then spans the
remaining epochs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Literal

import torch
from torch.optim.lr_scheduler import LambdaLR

from cnnlab.registry import SCHEDULERS
from cnnlab.validation import NonNegativeFloat, PositiveInt, Probability, Range

Interval = Literal["step", "epoch"]


def progress_schedule(
    optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int,
    warmup_epochs: float, interval: str,
    factor: Callable[[float, float, float], float],
) -> LambdaLR:
    """LambdaLR from ``factor(t, T, base_lr)``: t and T in epochs after warmup."""
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    total = max(epochs - warmup_steps / steps_per_epoch, 1e-12)

    def for_group(base_lr: float) -> Callable[[int], float]:
        def lr_factor(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            t = (step - warmup_steps) / steps_per_epoch
            if interval == "epoch":
                t = math.floor(t)
            return factor(min(t, total), total, base_lr)

        return lr_factor

    return LambdaLR(optimizer, [for_group(g["lr"]) for g in optimizer.param_groups])


@SCHEDULERS.register(family="basic")
def constant(
    *, optimizer, steps_per_epoch: int, epochs: int,
    warmup_epochs: NonNegativeFloat = 0.0, interval: Interval = "step",
) -> LambdaLR:
    """The optimizer's learning rate throughout (after the optional warmup)."""
    return progress_schedule(optimizer, steps_per_epoch, epochs, warmup_epochs, interval, lambda t, T, lr: 1.0)


@SCHEDULERS.register(family="step")
def step(
    *, optimizer, steps_per_epoch: int, epochs: int,
    step_size: PositiveInt = 30, gamma: Probability = 0.1,
    warmup_epochs: NonNegativeFloat = 0.0, interval: Interval = "epoch",
) -> LambdaLR:
    """Step decay: multiply the learning rate by gamma every step_size epochs."""
    return progress_schedule(optimizer, steps_per_epoch, epochs, warmup_epochs, interval,
                             lambda t, T, lr: gamma ** math.floor(t / step_size))


@SCHEDULERS.register(family="cosine")
def cosine(
    *, optimizer, steps_per_epoch: int, epochs: int,
    eta_min: NonNegativeFloat = 0.0,
    warmup_epochs: NonNegativeFloat = 0.0, interval: Interval = "step",
) -> LambdaLR:
    """Cosine annealing, half a period: eta_t = eta_min + (eta_max - eta_min)(1 + cos(pi t / T)) / 2."""
    return progress_schedule(
        optimizer, steps_per_epoch, epochs, warmup_epochs, interval,
        lambda t, T, lr: (eta_min + 0.5 * (lr - eta_min) * (1 + math.cos(math.pi * t / T))) / lr,
    )


@SCHEDULERS.register(family="cosine")
def onecycle(
    *, optimizer, steps_per_epoch: int, epochs: int,
    pct_start: Probability = 0.25, div_factor: Annotated[float, Range(ge=1)] = 25.0,
    final_div_factor: Annotated[float, Range(ge=1)] = 1e4, interval: Interval = "step",
) -> LambdaLR:
    """One-cycle (Smith): rise linearly from lr/div_factor to lr over pct_start of the run, then cosine down to lr/(div_factor*final_div_factor)."""
    start, end = 1 / div_factor, 1 / (div_factor * final_div_factor)

    def factor(t: float, T: float, lr: float) -> float:
        p = t / T
        if p < pct_start:
            return start + (1 - start) * p / pct_start
        q = (p - pct_start) / (1 - pct_start)
        return end + 0.5 * (1 - end) * (1 + math.cos(math.pi * q))

    return progress_schedule(optimizer, steps_per_epoch, epochs, 0.0, interval, factor)
