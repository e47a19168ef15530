"""Which GPU each local worker of a search trains on: worker w of a sweep (or of a tune) is a process of its own
that sees one GPU through CUDA_VISIBLE_DEVICES, ``trials_per_gpu`` workers to a GPU, round-robin, so that fewer
workers than slots still spread over every GPU before any GPU takes a second."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from cnnlab.core.errors import CnnlabError


def visible_gpus(setting: Any, key: str = "hydra.sweeper.gpus") -> list[str]:
    """The GPUs a search may use. ``auto``: every GPU this process sees (the ids CUDA_VISIBLE_DEVICES lists, else
    0..N-1), none on a machine without CUDA; or a list of ids (numbers or UUIDs), as CUDA_VISIBLE_DEVICES names them."""
    if setting is None or setting == "auto":
        import torch

        if not torch.cuda.is_available():
            return []
        listed = os.environ.get("CUDA_VISIBLE_DEVICES")
        if listed:
            return [g.strip() for g in listed.split(",") if g.strip()][:torch.cuda.device_count()]
        return [str(i) for i in range(torch.cuda.device_count())]
    if isinstance(setting, str | int) and not isinstance(setting, bool):
        setting = [setting]
    if not isinstance(setting, Sequence) or not all(isinstance(g, str | int) and not isinstance(g, bool) for g in setting):
        raise CnnlabError(f"{key} must be auto or a list of GPU ids, e.g. [0,1], got {setting!r}")
    ids = [str(g).strip() for g in setting]
    if len(set(ids)) != len(ids) or not all(ids):
        raise CnnlabError(f"{key} lists a GPU twice or an empty id: {setting!r}")
    return ids


def check_per_gpu(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CnnlabError(f"{key} must be an integer >= 1, got {value!r}")
    return value


def local_workers(n_jobs: Any, gpus: list[str], per_gpu: int, key: str) -> int:
    """``n_jobs``: a number of worker processes, or auto: one for each of the ``per_gpu`` slots of each GPU, and 1
    on a machine without one."""
    if n_jobs == "auto":
        return len(gpus) * per_gpu if gpus else 1
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs < 1:
        raise CnnlabError(f"{key} must be auto or an integer >= 1, got {n_jobs!r}")
    return n_jobs


def worker_gpus(workers: int, gpus: list[str]) -> list[str | None]:
    """The GPU of each worker (None for all on a machine without one): round-robin over ``gpus``."""
    return [gpus[w % len(gpus)] if gpus else None for w in range(workers)]


def described(assigned: list[str | None]) -> str:
    """'worker 0: GPU 0, worker 1: GPU 1, ...' for the search's first lines."""
    return ", ".join(f"worker {w}: GPU {g}" for w, g in enumerate(assigned))
