"""The lectures' babysitting checks that watch the weights while a run trains: the ratio of each
layer's update to its weights ("about 1e-3"), and ReLU units that never fire."""

from __future__ import annotations

from statistics import median

import torch
from torch import nn

from cnnlab.models.inspect_model import forward_with_hooks

# Far off the lectures' rule of thumb of about 1e-3: a median ratio outside this band gets a warning.
UPDATE_RATIO_BAND = (1e-4, 1e-2)


class UpdateRatio:
    """||W_after - W_before|| / ||W_before|| for each weight matrix or kernel (biases and norms aside).

    Judged once an epoch, on the median of the epoch's logged medians: early steps run high and an
    annealed learning rate ends low, by design; an epoch far off the band is what the lectures flag."""

    def __init__(self, model: nn.Module):
        self.weights = {name: p for name, p in model.named_parameters() if p.ndim > 1 and p.requires_grad}
        self.before: list[torch.Tensor] | None = None
        self.medians: list[float] = []  # this epoch's, one per logged step
        self.warned: set[str] = set()

    def snapshot(self) -> None:
        self.before = [p.detach().clone() for p in self.weights.values()]

    def ratios(self) -> dict[str, float]:
        """The ratios since the snapshot (one host sync for all layers)."""
        if self.before is None or not self.weights:
            return {}
        values = torch.stack([(p.detach() - b).norm() / b.norm().clamp_min(1e-12)
                              for p, b in zip(self.weights.values(), self.before)]).tolist()
        self.before = None
        self.medians.append(median(values))
        return dict(zip(self.weights, values))

    def judge(self, epoch: int) -> str | None:
        """At an epoch's end: a warning, once per direction, when the epoch's typical ratio is far from 1e-3."""
        typical, self.medians = (median(self.medians) if self.medians else None), []
        low, high = UPDATE_RATIO_BAND
        direction = None if typical is None else "high" if typical > high else "low" if typical < low else None
        if direction is None or direction in self.warned:
            return None
        self.warned.add(direction)
        return (f"update/weight ratio {typical:.1e} in epoch {epoch} (median over the logged steps and layers) is far "
                f"from the lectures' ~1e-3: the learning rate is probably too {direction}")


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
