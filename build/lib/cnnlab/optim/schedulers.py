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

from cnnlab.core.registry import SCHEDULERS
from cnnlab.core.validation import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Probability, Range

Interval = Literal["step", "epoch"]


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warmup: (step + 1) / warmup_steps over the first warmup_steps updates, then 1."""
    return (step + 1) / warmup_steps if step < warmup_steps else 1.0


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
                return warmup_factor(step, warmup_steps)
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


@SCHEDULERS.register(family="step")
def multistep(
    *, optimizer, steps_per_epoch: int, epochs: int,
    milestones: list[PositiveInt] = [30, 60, 90], gamma: Probability = 0.1,  # noqa: B006
    warmup_epochs: NonNegativeFloat = 0.0, interval: Interval = "epoch",
) -> LambdaLR:
    """Multiply the learning rate by gamma at each milestone epoch."""
    return progress_schedule(optimizer, steps_per_epoch, epochs, warmup_epochs, interval,
                             lambda t, T, lr: gamma ** sum(t >= m for m in milestones))


@SCHEDULERS.register(family="step")
def exponential(
    *, optimizer, steps_per_epoch: int, epochs: int,
    gamma: Annotated[float, Range(gt=0, le=1)] = 0.95,
    warmup_epochs: NonNegativeFloat = 0.0, interval: Interval = "epoch",
) -> LambdaLR:
    """Exponential decay: eta_t = eta_0 * gamma^t (t in epochs)."""
    return progress_schedule(optimizer, steps_per_epoch, epochs, warmup_epochs, interval, lambda t, T, lr: gamma ** t)


@SCHEDULERS.register(family="inverse")
def inverse_time(
    *, optimizer, steps_per_epoch: int, epochs: int,
    decay: PositiveFloat = 1.0, warmup_epochs: NonNegativeFloat = 0.0, interval: Interval = "epoch",
) -> LambdaLR:
    """The lectures' C/epoch: eta_t = eta_0 / (1 + decay * t)."""
    return progress_schedule(optimizer, steps_per_epoch, epochs, warmup_epochs, interval,
                             lambda t, T, lr: 1 / (1 + decay * t))


@SCHEDULERS.register(family="inverse")
def inverse_sqrt(
    *, optimizer, steps_per_epoch: int, epochs: int,
    decay: PositiveFloat = 1.0, warmup_epochs: NonNegativeFloat = 0.0, interval: Interval = "step",
) -> LambdaLR:
    """eta_t = eta_0 / sqrt(1 + decay * t)."""
    return progress_schedule(optimizer, steps_per_epoch, epochs, warmup_epochs, interval,
                             lambda t, T, lr: 1 / math.sqrt(1 + decay * t))


@SCHEDULERS.register(family="linear")
def linear(
    *, optimizer, steps_per_epoch: int, epochs: int,
    end_factor: Annotated[float, Range(ge=0, le=1)] = 0.0,
    warmup_epochs: NonNegativeFloat = 0.0, interval: Interval = "step",
) -> LambdaLR:
    """Linear decay from eta_0 to end_factor * eta_0 over the run."""
    return progress_schedule(optimizer, steps_per_epoch, epochs, warmup_epochs, interval,
                             lambda t, T, lr: 1 - (1 - end_factor) * t / T)


@SCHEDULERS.register(family="cosine")
def cosine_restarts(
    *, optimizer, steps_per_epoch: int, epochs: int,
    T_0: PositiveFloat = 10.0, T_mult: PositiveInt = 2, eta_min: NonNegativeFloat = 0.0,
    warmup_epochs: NonNegativeFloat = 0.0, interval: Interval = "step",
) -> LambdaLR:
    """SGDR (Loshchilov & Hutter): cosine cycles of T_0, T_0*T_mult, ... epochs, each restarting at eta_max."""

    def factor(t: float, T: float, lr: float) -> float:
        length = T_0
        while t >= length:  # find the cycle t falls in
            t -= length
            length *= T_mult
        return (eta_min + 0.5 * (lr - eta_min) * (1 + math.cos(math.pi * t / length))) / lr

    return progress_schedule(optimizer, steps_per_epoch, epochs, warmup_epochs, interval, factor)


class PlateauSchedule(LambdaLR):
    """Warmup, then the lr times factor^k, where k counts the reductions so far.

    observe(val_loss) after each epoch: when the loss has not improved by more than
    `threshold` (relative) for `patience` epochs, k grows by one (down to min_lr).
    """

    def __init__(self, optimizer, warmup_steps: int, factor: float, patience: int, threshold: float, min_lr: float):
        self.factor, self.patience, self.threshold, self.min_lr = factor, patience, threshold, min_lr
        self.best, self.bad_epochs, self.reductions = math.inf, 0, 0
        base = [g["lr"] for g in optimizer.param_groups]

        def for_group(base_lr: float) -> Callable[[int], float]:
            def lr_factor(step: int) -> float:
                return warmup_factor(step, warmup_steps) * max(factor ** self.reductions, min_lr / base_lr)
            return lr_factor

        super().__init__(optimizer, [for_group(b) for b in base])

    def observe(self, val_loss: float) -> None:
        if val_loss < self.best * (1 - self.threshold):
            self.best, self.bad_epochs = val_loss, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            self.reductions += 1
            self.bad_epochs = 0
            for group, fn in zip(self.optimizer.param_groups, self.lr_lambdas):
                group["lr"] = group["initial_lr"] * fn(self.last_epoch)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(best=self.best, bad_epochs=self.bad_epochs, reductions=self.reductions)
        return state

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.best, self.bad_epochs, self.reductions = state.pop("best"), state.pop("bad_epochs"), state.pop("reductions")
        super().load_state_dict(state)


@SCHEDULERS.register(family="plateau")
def plateau(
    *, optimizer, steps_per_epoch: int, epochs: int,
    factor: Probability = 0.1, patience: NonNegativeInt = 10, threshold: NonNegativeFloat = 1e-4,
    min_lr: NonNegativeFloat = 0.0, warmup_epochs: NonNegativeFloat = 0.0,
) -> PlateauSchedule:
    """Reduce on plateau: multiply the lr by factor when the validation loss stalls for patience epochs."""
    return PlateauSchedule(optimizer, round(warmup_epochs * steps_per_epoch), factor, patience, threshold, min_lr)
