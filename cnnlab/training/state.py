"""A trainer's state in a checkpoint, beside the weights: every random generator, as plain values that
torch.load(weights_only=True) reads back; and which weights a run selected."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Python's, numpy's, torch's (CPU and every CUDA device) and the run's own named generators."""
    return {
        "python": random.getstate(), "numpy": numpy_rng_state(), "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        **{name: g.get_state() for name, g in generators.items()},
    }


def restore_rng(rng: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    random.setstate(rng["python"])
    kind, keys, *rest = rng["numpy"]  # a list of plain values (an older checkpoint: numpy's tuple)
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    for name, generator in generators.items():
        generator.set_state(rng[name])


def numpy_rng_state() -> list[Any]:
    """numpy's global RNG state as plain values (its key array as a list), so a checkpoint loads with
    torch.load(weights_only=True) and no allow-listed numpy types."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), int(position), int(has_gauss), float(cached)]


def selected_weights(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights a checkpoint's run selected: the EMA when it was on, else the raw model."""
    return checkpoint["ema"] if checkpoint.get("selected") == "ema" else checkpoint["model"]
