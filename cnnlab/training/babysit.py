"""The lectures' babysitting checks that watch the weights while a run trains: the ratio of each
layer's update to its weights ("about 1e-3"), and ReLU units that never fire."""

from __future__ import annotations

from statistics import median

import torch
from torch import nn

from cnnlab.models.inspect_model import forward_with_hooks

# Far off the lectures' rule of thumb of about 1e-3: a median ratio outside this band gets a warning.
UPDATE_RATIO_BAND = (1e-4, 5e-2)


class UpdateRatio:
    """||W_after - W_before|| / ||W_before|| for each weight matrix or kernel (biases and norms aside).

    Judged once an epoch, per layer, on the logged steps where the rate means something: after warm-up
    (the learning rate no longer rising) and at no less than half the highest rate so far. A fresh network's
    first updates are large by design, and an annealed rate ends low by design; a layer whose median over
    the judged steps is far from the lectures' ~1e-3 is what they flag."""

    def __init__(self, model: nn.Module):
        self.weights = {name: p for name, p in model.named_parameters() if p.ndim > 1 and p.requires_grad}
        self.before: list[torch.Tensor] | None = None
        self.judged: dict[str, list[float]] = {name: [] for name in self.weights}  # this epoch's judged steps
        self.previous_lr: float | None = None
        self.peak_lr = 0.0
        self.warned: set[str] = set()

    def snapshot(self, lr: float) -> None:
        """Before an update made at learning rate ``lr``."""
        self.before, self.lr = [p.detach().clone() for p in self.weights.values()], lr

    def ratios(self) -> dict[str, float]:
        """The ratios since the snapshot (one host sync for all layers)."""
        if self.before is None or not self.weights:
            return {}
        lr = self.lr
        values = torch.stack([(p.detach() - b).norm() / b.norm().clamp_min(1e-12)
                              for p, b in zip(self.weights.values(), self.before)]).tolist()
        self.before = None
        # The first logged step cannot tell whether the rate still rises: it is not judged.
        settled = self.previous_lr is not None and lr <= self.previous_lr * (1 + 1e-9)
        self.previous_lr, self.peak_lr = lr, max(self.peak_lr, lr)
        if settled and lr >= 0.5 * self.peak_lr:
            for name, value in zip(self.weights, values):
                self.judged[name].append(value)
        return dict(zip(self.weights, values))

    def judge(self, epoch: int) -> str | None:
        """At an epoch's end: a warning, once per direction, naming the layer whose median over the epoch's
        judged steps is furthest outside UPDATE_RATIO_BAND."""
        medians = {name: median(values) for name, values in self.judged.items() if values}
        self.judged = {name: [] for name in self.weights}
        low, high = UPDATE_RATIO_BAND
        for direction, outside in (("high", {n: m for n, m in medians.items() if m > high}),
                                   ("low", {n: m for n, m in medians.items() if m < low})):
            if not outside or direction in self.warned:
                continue
            self.warned.add(direction)
            worst = (max if direction == "high" else min)(outside, key=outside.get)
            others = f"; {len(outside) - 1} more of {len(medians)} layers too" if len(outside) > 1 else ""
            return (f"update/weight ratio of {worst} is {outside[worst]:.1e} in epoch {epoch} (median over the logged "
                    f"steps after warm-up{others}), far from the lectures' ~1e-3: the learning rate is probably too "
                    f"{direction}")
        return None


def dead_unit_fractions(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """For each ReLU, the fraction of its units (channels of a conv map, features of a vector) that are
    not positive for any image of ``x``, with the model in evaluation mode."""
    counts: dict[str, int] = {}
    fractions: dict[str, float] = {}

    def hook(name: str):
        def record(_module, _inputs, out: torch.Tensor) -> None:
            calls = counts[name] = counts.get(name, 0) + 1  # a ReLU module used twice (torchvision) counts twice
            alive = out.transpose(0, 1).flatten(1).amax(1) > 0
            fractions[name if calls == 1 else f"{name}#{calls}"] = 1.0 - alive.float().mean().item()
        return record

    forward_with_hooks(model, x, [(m, hook(name)) for name, m in model.named_modules() if isinstance(m, nn.ReLU)])
    return fractions
