"""New optimizer hyperparameters on a run continued from its checkpoint (population-based training).

Loading a checkpoint puts the saved hyperparameters back into the optimizer's parameter groups and the
saved base learning rates into the scheduler, so the new config's values are applied after the load:

- ``lr`` scales every group and the schedule by new / old, so per-group ratios (``finetune.head_lr``,
  ``backbone_lr``) and the schedule's shape are kept; the step the schedule has reached is unchanged;
- any other option a group holds (``weight_decay``, ``momentum``, ``eps`` ...) is set in the groups
  that held the old value; a group with a value of its own (no decay on norms and biases) keeps it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")  # what LR schedulers keep in a group, all relative to lr


def retune_optimizer(optimizer: torch.optim.Optimizer, scheduler, old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple]:
    """Apply ``new`` optimizer options (the config's ``optimizer`` section) where they differ from ``old``
    (the checkpoint's). Returns {option: (old, new)} for what changed."""
    changed = {k: (old.get(k), v) for k, v in new.items() if k != "name" and old.get(k) != v}
    for option, (before, after) in changed.items():
        if option == "lr":
            ratio = after / before
            for group in optimizer.param_groups:
                for key in LR_KEYS:
                    if key in group:
                        group[key] *= ratio
            if hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs = [lr * ratio for lr in scheduler.base_lrs]
            if hasattr(scheduler, "_last_lr"):
                scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
            continue
        for group in optimizer.param_groups:
            if option in group and _same(group[option], before):
                group[option] = after
    return changed


def describe(changed: dict[str, tuple]) -> str:
    """'optimizer.lr 0.1 -> 0.08, optimizer.momentum 0.9 -> 0.95'."""
    def shown(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    return ", ".join(f"optimizer.{k} {shown(a)} -> {shown(b)}" for k, (a, b) in changed.items())


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return a == b
