"""What a resume may change. A checkpoint carries its run's resolved config; resuming
with a config that trains differently would splice two experiments into one record,
so anything beyond the keys below is refused, with the differences listed."""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from cnnlab.core.config import flatten
from cnnlab.core.errors import CnnlabError

# Keys that change how long, where or how verbosely a run trains, not what it computes.
ALLOWED_ON_RESUME = (
    "trainer.epochs", "trainer.device", "trainer.devices", "trainer.log_every_n_steps", "trainer.log_params_every_n_steps",
    "trainer.log_update_ratio", "trainer.log_dead_units",
    "trainer.checkpoint_every_n_steps", "trainer.limit_eval_batches", "trainer.eval_train_at_end",
    "trainer.tta_flip", "trainer.tta_shift", "trainer.early_stopping_patience", "trainer.initial_loss_check",
    "data.num_workers", "data.prefetch_factor", "data.eval_batch_size", "paths.*", "sweep.*", "viz.*", "name",
)
# What population-based training may change when a member continues (Job.retune): the lectures'
# learning rate, weight decay, momentum, dropout and augmentation strength (an augmentation op's options).
RETUNABLE = ("optimizer.lr", "optimizer.weight_decay", "optimizer.momentum", "model.dropout", "augment.ops.*.*")
_ABSENT = object()


def retunable(key: str) -> bool:
    return any(fnmatch(key, pattern) for pattern in RETUNABLE)


def config_changes(saved: dict[str, Any], current: dict[str, Any], also_allowed: tuple[str, ...] = ()) -> list[str]:
    """'key: old -> new' for every difference outside ALLOWED_ON_RESUME and ``also_allowed``."""
    old, new = flatten(saved), flatten(current)
    changes = []
    for key in sorted(old.keys() | new.keys()):
        if any(fnmatch(key, pattern) for pattern in (*ALLOWED_ON_RESUME, *also_allowed)):
            continue
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if a != b:
            changes.append(f"{key}: {'(absent)' if a is _ABSENT else a!r} -> {'(absent)' if b is _ABSENT else b!r}")
    return changes


def check_resumable(state: dict[str, Any], path: Path, current: dict[str, Any], run_dir: Path,
                    also_allowed: tuple[str, ...] = ()) -> None:
    changes = config_changes(state.get("config") or {}, current, also_allowed)
    if changes:
        raise CnnlabError(f"cannot resume {run_dir}: the config differs from {path}'s in {'; '.join(changes)} "
                          f"(a resume may change only: {', '.join(ALLOWED_ON_RESUME)})")
    epochs = (current.get("trainer") or {}).get("epochs")
    if state.get("partial") is None and epochs is not None and state["epoch"] >= epochs:
        raise CnnlabError(f"{run_dir} has already trained {state['epoch']} epochs (trainer.epochs={epochs}); "
                          "raise trainer.epochs to train on, or choose a new hydra.run.dir")
